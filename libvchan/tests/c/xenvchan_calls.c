/*
 * Xen's libxenvchan API, built against Debian's <libxenvchan.h> (libxen-dev)
 * and linked with our library: the public struct's layout as that header
 * has it ("layout" mode: prints it for tests/c_abi.rs to compare), then a
 * server (this process, domain 0) and a client (forked, domain 1) that set
 * `ctrl->blocking` directly, as Xen's vchan-node and Qubes' libvchan-xen do,
 * and call every function.
 */
#include <stddef.h>

#include "common.h"

#include <libxenvchan.h>

/* Byte index and value of the one non-zero byte after setting one field. */
#define BIT(field)                                                           \
    do {                                                                     \
        struct libxenvchan s_;                                               \
        unsigned char *b_ = (unsigned char *)&s_;                            \
        size_t i_;                                                           \
        memset(&s_, 0, sizeof(s_));                                          \
        s_.field = 1;                                                        \
        for (i_ = 0; i_ < sizeof(s_); i_++)                                  \
            if (b_[i_])                                                      \
                printf(#field " %zu %u\n", i_, b_[i_]);                      \
    } while (0)

static void layout(void) {
    printf("sizeof %zu\n", sizeof(struct libxenvchan));
    printf("ring %zu\n", offsetof(struct libxenvchan, ring));
    printf("event %zu\n", offsetof(struct libxenvchan, event));
    printf("event_port %zu\n", offsetof(struct libxenvchan, event_port));
    printf("read %zu\n", offsetof(struct libxenvchan, read));
    printf("write %zu\n", offsetof(struct libxenvchan, write));
    printf("xs_path %zu\n", offsetof(struct libxenvchan, xs_path));
    printf("ring_sizeof %zu\n", sizeof(struct libxenvchan_ring));
    printf("ring_order %zu\n", offsetof(struct libxenvchan_ring, order));
    BIT(is_server);
    BIT(server_persist);
    BIT(blocking);
}

#define WAIT_UNTIL(v, pred)                                                  \
    WAIT_EVENTS_UNTIL(libxenvchan_fd_for_select, libxenvchan_wait, v, pred)

static void client(void) {
    struct libxenvchan *c;
    char buf[64];

    who = "client";
    setenv("VCHAN_DOMAIN", "1", 1);
    c = libxenvchan_client_init(NULL, 0, "/local/domain/0/data/vchan/1/4242");
    CHECK(c != NULL);
    CHECK(!c->is_server);
    CHECK(!c->blocking);
    if (getenv("VCHAN_SOCKET_DIR"))
        /* The socket flavour's client cannot learn the server's ring
         * sizes: its buffers are 64 KiB (the crate docs). */
        CHECK(c->read.order == 16 && c->write.order == 16);
    else
        CHECK(c->read.order == 11 && c->write.order == 10);
    c->blocking = 1;
    CHECK(libxenvchan_is_open(c) == 1);
    CHECK(libxenvchan_send(c, "hello", 5) == 5);
    CHECK(libxenvchan_recv(c, buf, 5) == 5);
    CHECK(memcmp(buf, "world", 5) == 0);
    CHECK(libxenvchan_write(c, "bye", 3) == 3);
    CHECK(libxenvchan_read(c, buf, sizeof(buf)) == 2);
    CHECK(memcmp(buf, "ok", 2) == 0);
    libxenvchan_close(c);
    printf("ok %d checks (client)\n", checks);
    exit(0);
}

int main(int argc, char **argv) {
    struct libxenvchan *s;
    char buf[4096];
    int status;
    pid_t pid;

    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc > 1 && strcmp(argv[1], "layout") == 0) {
        layout();
        return 0;
    }

    errno = 0;
    CHECK(libxenvchan_read(NULL, buf, 1) == -1 && errno == EBADF);
    CHECK(libxenvchan_server_init(NULL, 1, "some/other/path", 1024, 2048) == NULL);
    CHECK(libxenvchan_server_init(NULL, 2, "data/vchan/1/4242", 1024, 2048) == NULL);
    /* No server yet: the client fails at once, as libxenvchan's does. */
    CHECK(libxenvchan_client_init(NULL, 1, "/local/domain/1/data/vchan/0/4242") == NULL);

    s = libxenvchan_server_init(NULL, 1, "data/vchan/1/4242", 1024, 2048);
    CHECK(s != NULL);
    CHECK(s->is_server);
    CHECK(!s->blocking); /* libxenvchan starts non-blocking */
    CHECK(s->read.order == 10 && s->write.order == 11);
    CHECK(s->xs_path != NULL && strcmp(s->xs_path, "data/vchan/1/4242") == 0);
    CHECK(libxenvchan_is_open(s) == 2);
    CHECK(libxenvchan_recv(s, buf, 5) == 0); /* non-blocking, nothing yet */

    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0)
        client();

    WAIT_UNTIL(s, libxenvchan_data_ready(s) >= 5);
    CHECK(libxenvchan_is_open(s) == 1);
    CHECK(libxenvchan_recv(s, buf, 5) == 5);
    CHECK(memcmp(buf, "hello", 5) == 0);
    CHECK(libxenvchan_send(s, buf, 4096) == -1 && errno == EINVAL);
    CHECK(libxenvchan_buffer_space(s) > 0);
    s->blocking = 1;
    CHECK(libxenvchan_write(s, "world", 5) == 5);
    CHECK(libxenvchan_recv(s, buf, 3) == 3); /* blocking: waits for "bye" */
    CHECK(memcmp(buf, "bye", 3) == 0);
    CHECK(libxenvchan_send(s, "ok", 2) == 2);
    WAIT_UNTIL(s, libxenvchan_is_open(s) == 0);
    CHECK(libxenvchan_read(s, buf, 1) == -1);
    CHECK(libxenvchan_write(s, "x", 1) == -1);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    libxenvchan_close(s);
    CHECK(libxenvchan_is_open(s) == 0);
    printf("ok %d checks (server)\n", checks);
    return 0;
}

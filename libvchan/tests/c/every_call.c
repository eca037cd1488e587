/*
 * Calls every function of the libvchan API through a C compiler and the
 * dynamic linker, as a C program of Qubes does: bad input first, then a
 * server (this process, domain VCHAN_DOMAIN) and a client (a forked child
 * that plays domain 1) exchanging data, closing, reconnecting.
 *
 * Built by tests/c_abi.rs against our header and against upstream's
 * (-DLIBVCHAN_HEADER=...), linked with our library, run on the socket and
 * the local transports. Exit 0 and "ok <n> checks" on success; otherwise a
 * FAIL line naming the check.
 */
#include "common.h"

#include LIBVCHAN_HEADER

#define PORT 4242

#define WAIT_UNTIL(v, pred)                                                  \
    WAIT_EVENTS_UNTIL(libvchan_fd_for_select, libvchan_wait, v, pred)

static void bad_input(void) {
    char buf[16];
    int fd;

    errno = 0;
    CHECK(libvchan_server_init(-1, PORT, 1024, 1024) == NULL);
    CHECK(errno == EINVAL);
    CHECK(libvchan_server_init(0x7ff0, PORT, 1024, 1024) == NULL);
    CHECK(libvchan_server_init(1, -1, 1024, 1024) == NULL);
    errno = 0;
    CHECK(libvchan_server_init(1, PORT, (2 << 20), 1024) == NULL);
    CHECK(errno == EINVAL);
    CHECK(libvchan_client_init(-3, PORT) == NULL);
    CHECK(libvchan_client_init(1, -1) == NULL);
    CHECK(libvchan_client_init_async(1, PORT, NULL) == NULL);
    CHECK(libvchan_client_init_async(0x7fff, PORT, &fd) == NULL);

    CHECK_ERR(libvchan_write(NULL, "x", 1), EBADF);
    CHECK_ERR(libvchan_send(NULL, "x", 1), EBADF);
    CHECK_ERR(libvchan_read(NULL, buf, 1), EBADF);
    CHECK_ERR(libvchan_recv(NULL, buf, 1), EBADF);
    CHECK_ERR(libvchan_wait(NULL), EBADF);
    CHECK_ERR(libvchan_fd_for_select(NULL), EBADF);
    CHECK_ERR(libvchan_data_ready(NULL), EBADF);
    CHECK_ERR(libvchan_buffer_space(NULL), EBADF);
    CHECK_ERR(libvchan_client_init_async_finish(NULL, true), EBADF);
    CHECK(libvchan_is_open(NULL) == VCHAN_DISCONNECTED);
    libvchan_close(NULL);
#ifndef NO_SET_BLOCKING
    libvchan_set_blocking(NULL, false);
#endif
}

static void client(void) {
    libvchan_t *c;
    int watch_fd = -1, r, i;
    char buf[4096];

    who = "client";
    setenv("VCHAN_DOMAIN", "1", 1);

    /* Async connect, driven by the watch fd. */
    c = libvchan_client_init_async(0, PORT, &watch_fd);
    CHECK(c != NULL);
    CHECK(watch_fd >= 0);
    CHECK(libvchan_is_open(c) == VCHAN_WAITING);
    CHECK(libvchan_data_ready(c) == 0);
    CHECK(libvchan_buffer_space(c) == 0);
    CHECK(libvchan_wait(c) == 0);
    CHECK_ERR(libvchan_send(c, "x", 1), EAGAIN);
    CHECK_ERR(libvchan_read(c, buf, 1), EAGAIN);
    CHECK_ERR(libvchan_fd_for_select(c), EAGAIN);
    do {
        struct pollfd p = {watch_fd, POLLIN, 0};
        CHECK(poll(&p, 1, 10000) == 1);
        r = libvchan_client_init_async_finish(c, true);
        CHECK(r >= 0);
    } while (r == 1);
    CHECK(libvchan_is_open(c) == VCHAN_CONNECTED);

    /* 0: what the server wrote before we came. */
    CHECK(libvchan_recv(c, buf, 5) == 5);
    CHECK(memcmp(buf, "early", 5) == 0);
    /* 1: packet to the server. */
    CHECK(libvchan_send(c, "hello", 5) == 5);
    /* 3: packet from the server. */
    CHECK(libvchan_recv(c, buf, 5) == 5);
    CHECK(memcmp(buf, "world", 5) == 0);
    /* 4: a stream larger than the server's 1 KiB read ring. */
    for (i = 0; i < 3000; i++)
        buf[i] = (char)(i * 7);
    CHECK(libvchan_write(c, buf, 3000) == 3000);
    /* 5: last words, then close. */
    CHECK(libvchan_write(c, "bye", 3) == 3);
    /* Wait until the server has seen all of it before closing (the socket
     * transport flushes on close anyway; this keeps both paths alike). */
    CHECK(libvchan_recv(c, buf, 2) == 2);
    CHECK(memcmp(buf, "ok", 2) == 0);
    libvchan_close(c);

    /* 7: the blocking client. */
    c = libvchan_client_init(0, PORT + 1);
    CHECK(c != NULL);
    CHECK(libvchan_is_open(c) == VCHAN_CONNECTED);
    CHECK(libvchan_send(c, "!", 1) == 1);
    CHECK(libvchan_recv(c, buf, 1) == 1);
    CHECK(buf[0] == '?');
    libvchan_close(c);
    printf("ok %d checks (client)\n", checks);
    exit(0);
}

int main(void) {
    libvchan_t *s;
    char buf[4096], big[8192];
    int total = 0, r, status, i;
    pid_t pid;
    /* libvchan-socket's rings are at least a page, libxenvchan's as asked. */
    int socket = getenv("VCHAN_SOCKET_DIR") != NULL;
    int read_ring = socket ? 4096 : 1024, write_ring = socket ? 4096 : 2048;

    setvbuf(stdout, NULL, _IONBF, 0);
    bad_input();

    s = libvchan_server_init(1, PORT, 1024, 2048);
    CHECK(s != NULL);
    CHECK(libvchan_is_open(s) == VCHAN_WAITING);
    CHECK(libvchan_fd_for_select(s) >= 0);
    /* 0: a server may write before its client comes; it gets the data. */
    CHECK(libvchan_write(s, "early", 5) == 5);
    CHECK(libvchan_buffer_space(s) == write_ring - 5);

    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0)
        client();

    WAIT_UNTIL(s, libvchan_is_open(s) != VCHAN_WAITING);
    CHECK(libvchan_is_open(s) == VCHAN_CONNECTED);

    /* 1 */
    CHECK(libvchan_recv(s, buf, 5) == 5);
    CHECK(memcmp(buf, "hello", 5) == 0);
    /* 2: nothing in flight: non-blocking calls return 0. */
#ifndef NO_SET_BLOCKING
    libvchan_set_blocking(s, false);
    CHECK(libvchan_read(s, buf, 10) == 0);
    CHECK(libvchan_recv(s, buf, 4) == 0);
    libvchan_set_blocking(s, true);
#endif
    /* Larger than the ring: an error, never a wait. */
    memset(big, 'z', sizeof(big));
    CHECK_ERR(libvchan_send(s, big, write_ring + 1), EINVAL);
    CHECK_ERR(libvchan_recv(s, big, read_ring + 1), EINVAL);
    CHECK(libvchan_buffer_space(s) > 0);
    CHECK(libvchan_buffer_space(s) <= write_ring);
    /* 3 */
    CHECK(libvchan_write(s, "world", 5) == 5);
    /* 4 */
    while (total < 3000) {
        r = libvchan_read(s, buf + total, (size_t)(3000 - total));
        CHECK(r > 0);
        CHECK(r <= read_ring);
        total += r;
    }
    for (i = 0; i < 3000; i++)
        CHECK(buf[i] == (char)(i * 7));
    /* 5: "bye" arrives; the client closes after our "ok". */
    WAIT_UNTIL(s, libvchan_data_ready(s) >= 3);
    CHECK(libvchan_send(s, "ok", 2) == 2);
    WAIT_UNTIL(s, libvchan_is_open(s) == VCHAN_DISCONNECTED);
    /* The close has been seen: the select fd must go quiet (a fd that stays
     * readable keeps ppoll from ever sleeping or delivering signals). */
    for (i = 0;; i++) {
        struct pollfd p = {libvchan_fd_for_select(s), POLLIN, 0};
        CHECK(i < 10);
        if (poll(&p, 1, 50) == 0)
            break;
        CHECK(libvchan_wait(s) == 0);
    }
    CHECK(libvchan_data_ready(s) == 3);
    CHECK_ERR(libvchan_recv(s, buf, 4), EPIPE);
    CHECK(libvchan_read(s, buf, 10) == 3);
    CHECK(memcmp(buf, "bye", 3) == 0);
    CHECK_ERR(libvchan_read(s, buf, 10), EPIPE);
    CHECK_ERR(libvchan_write(s, "x", 1), EPIPE);
    CHECK_ERR(libvchan_send(s, "x", 1), EPIPE);
    /* 6 */
    libvchan_close(s);
    CHECK_ERR(libvchan_read(s, buf, 1), EBADF);
    CHECK(libvchan_is_open(s) == VCHAN_DISCONNECTED);
    libvchan_close(s);

    /* 7: the blocking client connects to a second server. */
    s = libvchan_server_init(1, PORT + 1, 1024, 1024);
    CHECK(s != NULL);
    WAIT_UNTIL(s, libvchan_is_open(s) != VCHAN_WAITING);
    CHECK(libvchan_recv(s, buf, 1) == 1);
    CHECK(buf[0] == '!');
    CHECK(libvchan_send(s, "?", 1) == 1);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    libvchan_close(s);
    printf("ok %d checks (server)\n", checks);
    return 0;
}

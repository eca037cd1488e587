/*
 * The select fd after a call other than libvchan_wait took data in, as
 * qrexec's loops do it (libvchan_data_ready / libvchan_buffer_space, then
 * ppoll on libvchan_fd_for_select): the fd must show the data at once.
 * On the socket transport those calls move what arrived from the socket
 * into the library's buffer, so a select fd that only watches the socket
 * goes quiet while data waits in the buffer, and the program sleeps for
 * its whole poll timeout (qrexec: 1 s or 10 s).
 *
 * The server is this process (domain VCHAN_DOMAIN = 0), the client a
 * forked child (domain 1); a pipe pair orders the steps, so that the data
 * is on the socket before the server looks and nothing else is in flight.
 * Built by tests/c_abi.rs against our header, run on the socket transport.
 * Exit 0 and "ok <n> checks (server)" on success; otherwise a FAIL line.
 */
#include "common.h"

#include "libvchan.h"

#define PORT 4343

/* The fd is readable within `ms` milliseconds. */
static int readable(libvchan_t *v, int ms) {
    struct pollfd p = {libvchan_fd_for_select(v), POLLIN, 0};
    CHECK(p.fd >= 0);
    return poll(&p, 1, ms) == 1;
}

/* Takes every pending event (bounded) until the fd is quiet. */
static void settle(libvchan_t *v) {
    int i;
    for (i = 0; readable(v, 0); i++) {
        CHECK(i < 100);
        CHECK(libvchan_wait(v) == 0);
    }
}

static void client(int go, int done) {
    libvchan_t *c;
    char b;

    who = "client";
    setenv("VCHAN_DOMAIN", "1", 1);
    c = libvchan_client_init(0, PORT);
    CHECK(c != NULL);
    CHECK(read(go, &b, 1) == 1);
    CHECK(libvchan_send(c, "ping", 4) == 4);
    /* Our library sends before it returns; once the server has it, or the
     * data is at least on the socket, tell the server. */
    CHECK(write(done, "s", 1) == 1);
    /* Stay connected until the server is done (no hang-up event). */
    CHECK(read(go, &b, 1) == 1);
    libvchan_close(c);
    exit(0);
}

int main(void) {
    libvchan_t *s;
    int to_client[2], to_server[2], status, i;
    char buf[8], b;
    pid_t pid;

    setvbuf(stdout, NULL, _IONBF, 0);
    CHECK(pipe(to_client) == 0 && pipe(to_server) == 0);
    s = libvchan_server_init(1, PORT, 4096, 4096);
    CHECK(s != NULL);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0)
        client(to_client[0], to_server[1]);
    for (i = 0; libvchan_is_open(s) == VCHAN_WAITING; i++) {
        CHECK(i < 1000);
        CHECK(readable(s, 10000));
        CHECK(libvchan_wait(s) == 0);
    }
    CHECK(libvchan_is_open(s) == VCHAN_CONNECTED);
    settle(s);

    /* The client sends "ping"; the server learns it from the pipe, not
     * from the vchan. */
    CHECK(write(to_client[1], "g", 1) == 1);
    CHECK(read(to_server[0], &b, 1) == 1);
    /* A call other than wait takes the data in (as qrexec's loop asks
     * libvchan_data_ready / libvchan_buffer_space before it sleeps)... */
    for (i = 0; libvchan_data_ready(s) < 4; i++) {
        CHECK(i < 5000);
        usleep(1000);
    }
    CHECK(libvchan_buffer_space(s) > 0);
    /* ...then the program sleeps on the fd: it must wake at once. A fd
     * that watches only the socket sleeps the whole 2 s and fails here. */
    CHECK(readable(s, 2000));
    /* The wait that follows takes the event without sleeping, and the fd
     * is quiet again: the news was shown once, not forever. */
    alarm(10);
    CHECK(libvchan_wait(s) == 0);
    alarm(0);
    CHECK(!readable(s, 0));
    CHECK(libvchan_recv(s, buf, 4) == 4);
    CHECK(memcmp(buf, "ping", 4) == 0);

    CHECK(write(to_client[1], "q", 1) == 1);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    libvchan_close(s);
    printf("ok %d checks (server)\n", checks);
    return 0;
}

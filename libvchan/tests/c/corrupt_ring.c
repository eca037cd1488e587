/*
 * A peer that corrupts the shared ring, seen through the C API: this
 * program is the server (domain VCHAN_DOMAIN) of two vchans on the Local
 * transport (real shared memory); the peer is the Rust test in
 * tests/corrupt_ring.rs, which connects as the client and also maps our
 * control page a second time to scribble on the indices it owns.
 *
 * Steps, ordered by lines on stdin/stdout:
 *   port P:   "ready P"  -> the peer moves left.prod
 *             (the producer index of the ring we read) 2^30 bytes ahead
 *             and says "go": every read-side call must return -1, EPROTO;
 *   port P+1: "ready P+1" -> the peer moves right.cons (how far it read
 *             what we write) 2^30 ahead and says "go": every write-side
 *             call must return -1, EPROTO.
 * Never a crash or a hang (the test kills us after 60 s). Exit 0 and
 * "ok <n> checks (server)" on success; otherwise a FAIL line.
 */
#include "common.h"

#include "libvchan.h"

#define PORT 4444
#define PEER 2

static libvchan_t *connected_server(int port) {
    libvchan_t *s = libvchan_server_init(PEER, port, 1024, 1024);
    int i;
    CHECK(s != NULL);
    for (i = 0; libvchan_is_open(s) == VCHAN_WAITING; i++) {
        struct pollfd p = {libvchan_fd_for_select(s), POLLIN, 0};
        CHECK(i < 1000);
        CHECK(poll(&p, 1, 10000) == 1);
        CHECK(libvchan_wait(s) == 0);
    }
    CHECK(libvchan_is_open(s) == VCHAN_CONNECTED);
    printf("ready %d\n", port);
    return s;
}

/* The peer's "go": it has done its damage. */
static void await_go(void) {
    char line[16];
    CHECK(fgets(line, sizeof(line), stdin) != NULL);
    CHECK(strcmp(line, "go\n") == 0);
}

int main(void) {
    libvchan_t *s;
    char buf[64];

    setvbuf(stdout, NULL, _IONBF, 0);

    /* The ring we read. */
    s = connected_server(PORT);
    await_go();
    CHECK_ERR(libvchan_data_ready(s), EPROTO);
    CHECK_ERR(libvchan_read(s, buf, sizeof(buf)), EPROTO);
    CHECK_ERR(libvchan_recv(s, buf, 2), EPROTO);
    /* A corrupt ring stays refused, and closing it is safe. */
    CHECK_ERR(libvchan_data_ready(s), EPROTO);
    libvchan_close(s);

    /* The ring we write. */
    s = connected_server(PORT + 1);
    await_go();
    CHECK_ERR(libvchan_buffer_space(s), EPROTO);
    CHECK_ERR(libvchan_write(s, "x", 1), EPROTO);
    CHECK_ERR(libvchan_send(s, "xy", 2), EPROTO);
    libvchan_close(s);

    printf("ok %d checks (server)\n", checks);
    return 0;
}

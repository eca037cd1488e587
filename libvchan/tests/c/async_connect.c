/*
 * The async client as Qubes' C agent drives it (libqrexec's
 * qubes_wait_for_vchan_connection_with_timeout): libvchan_client_init_async,
 * then ppoll on the watch fd, and libvchan_client_init_async_finish only
 * when the fd is readable. The server (the Rust test in
 * tests/async_connect.rs, domain 1) is already up when we start, so the fd
 * must become readable without anything else happening.
 *
 * argv: PEER_DOMAIN PORT ROUNDS. Each round connects, reads "ping", writes
 * "pong", closes. Exit 0 and "ok <rounds>" on success; 3 and a FAIL line
 * when the watch fd stayed quiet for 5 s (the C agent's symptom: "vchan
 * connection timeout"); 1 on any other failure.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libvchan.h"

static int connect_round(int domain, int port, int round) {
    int wait_fd = -1;
    libvchan_t *v = libvchan_client_init_async(domain, port, &wait_fd);
    if (!v || wait_fd < 0) {
        fprintf(stderr, "FAIL round %d: client_init_async: %s\n", round, strerror(errno));
        return 1;
    }
    for (int turn = 0;; turn++) {
        struct pollfd p = { .fd = wait_fd, .events = POLLIN | POLLHUP };
        int n = poll(&p, 1, 5000);
        if (n == 0) {
            fprintf(stderr, "FAIL round %d turn %d: the watch fd stayed quiet for 5 s\n",
                    round, turn);
            return 3;
        }
        if (n < 0) {
            fprintf(stderr, "FAIL round %d: poll: %s\n", round, strerror(errno));
            return 1;
        }
        int r = libvchan_client_init_async_finish(v, true);
        if (r < 0) {
            fprintf(stderr, "FAIL round %d: finish: %s\n", round, strerror(errno));
            return 1;
        }
        if (r == 0)
            break;
        if (turn > 50) {
            fprintf(stderr, "FAIL round %d: finish said wait %d times\n", round, turn);
            return 1;
        }
    }
    char buf[4];
    if (libvchan_recv(v, buf, 4) != 4 || memcmp(buf, "ping", 4) != 0) {
        fprintf(stderr, "FAIL round %d: recv: %s\n", round, strerror(errno));
        return 1;
    }
    if (libvchan_send(v, "pong", 4) != 4) {
        fprintf(stderr, "FAIL round %d: send: %s\n", round, strerror(errno));
        return 1;
    }
    libvchan_close(v);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PEER_DOMAIN PORT ROUNDS\n", argv[0]);
        return 2;
    }
    int domain = atoi(argv[1]), port = atoi(argv[2]), rounds = atoi(argv[3]);
    for (int i = 0; i < rounds; i++) {
        int rc = connect_round(domain, port, i);
        if (rc)
            return rc;
        /* the server of the next round says when it is up */
        printf("done %d\n", i);
        fflush(stdout);
        char line[16];
        if (i + 1 < rounds && !fgets(line, sizeof line, stdin))
            return 1;
    }
    printf("ok %d\n", rounds);
    return 0;
}

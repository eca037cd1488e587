/*
 * What every C test program here starts with: the headers they use, the
 * check counter, CHECK/CHECK_ERR (a failed check prints a FAIL line naming
 * the process and the source line, then exits 1) and the wait loop on a
 * select fd. Included as "common.h" (found next to the program) before the
 * API header under test; it names no function of that API itself (the
 * wait loop takes them as arguments), so it serves libvchan and
 * libxenvchan alike.
 */
#ifndef VCHAN_TESTS_COMMON_H
#define VCHAN_TESTS_COMMON_H

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int checks;
/* "server", or "client" in a forked child: the FAIL line says which. */
static const char *who = "server";

#define CHECK(cond)                                                          \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAIL (%s) line %d: %s (errno %d: %s)\n", who,   \
                    __LINE__, #cond, errno, strerror(errno));                \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

#define CHECK_ERR(call, err)                                                 \
    do {                                                                     \
        errno = 0;                                                           \
        CHECK((call) == -1);                                                 \
        CHECK(errno == (err));                                               \
    } while (0)

/* Waits on `fd_for_select(v)` until `pred` holds, calling `wait(v)` for
 * each readiness, as qrexec's loops do; bounded, so a lost wake fails a
 * check instead of hanging. */
#define WAIT_EVENTS_UNTIL(fd_for_select, wait, v, pred)                      \
    do {                                                                     \
        int rounds_ = 0;                                                     \
        while (!(pred)) {                                                    \
            struct pollfd p_ = {fd_for_select(v), POLLIN, 0};                \
            CHECK(p_.fd >= 0);                                               \
            CHECK(poll(&p_, 1, 10000) == 1);                                 \
            CHECK(wait(v) == 0);                                             \
            CHECK(++rounds_ < 100000);                                       \
        }                                                                    \
    } while (0)

#endif

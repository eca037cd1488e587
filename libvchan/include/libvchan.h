/*
 * libvchan.h: the C interface of Qubes' libvchan, as implemented by the
 * pure-Rust vchan (crate `libvchan` of rust-vchan). Source- and
 * binary-compatible with the header of qubes-core-vchan-xen and
 * qubes-core-vchan-socket: same names, types and values.
 *
 * SPDX-License-Identifier: MIT OR Apache-2.0
 *
 * The transport is chosen at each *_init call from the environment:
 * VCHAN_SOCKET_DIR set: Unix sockets (as libvchan-socket; own domain id in
 * VCHAN_DOMAIN); VCHAN_LOCAL_DIR set: the same-host local transport;
 * otherwise real Xen (grant tables, event channels, xenstore).
 *
 * Unless said otherwise, functions returning int give -1 on error with
 * errno set (EPIPE: the peer closed; EAGAIN: an async client has not
 * connected yet; EBADF: NULL or closed handle; EINVAL: bad argument).
 * A handle is used by one thread at a time.
 */
#ifndef LIBVCHAN_H
#define LIBVCHAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The type of the fd returned for select()/poll(). */
typedef int EVTCHN;

/* What libvchan_is_open() returns. */
#define VCHAN_DISCONNECTED 0 /* the peer closed, or its domain is gone */
#define VCHAN_CONNECTED 1    /* both ends are there */
#define VCHAN_WAITING 2      /* no client yet / server not found yet */

/* One end of a vchan; opaque. */
typedef struct libvchan libvchan_t;

/*
 * Server for a client in `domain` on `port`, with rings of at least
 * read_min / write_min bytes (at most 1 MiB each). Returns at once; the
 * client connects later. NULL on error.
 */
libvchan_t *libvchan_server_init(int domain, int port, size_t read_min,
                                 size_t write_min);

/*
 * Client of the server in `domain` on `port`; waits until the server is
 * there. NULL on error (for instance when the server's domain is gone).
 */
libvchan_t *libvchan_client_init(int domain, int port);

/*
 * Client connect without blocking. Stores in *watch_fd an fd to wait on;
 * each time it is readable call libvchan_client_init_async_finish(): it
 * returns 0 once connected (watch_fd is then closed), 1 to wait again,
 * -1 on error. After an error, or to give up, call libvchan_close().
 * `blocking` is the I/O mode of the connected vchan.
 */
libvchan_t *libvchan_client_init_async(int domain, int port, EVTCHN *watch_fd);
int libvchan_client_init_async_finish(libvchan_t *ctrl, bool blocking);

/*
 * Stream write: blocking mode writes all `size` bytes; non-blocking mode
 * what fits now (0 if nothing). Returns the count, -1 on error.
 */
int libvchan_write(libvchan_t *ctrl, const void *data, size_t size);

/*
 * Packet send: all `size` bytes or nothing (non-blocking: 0 if they do not
 * fit now). -1 if size exceeds the ring, if the peer closed, on error.
 */
int libvchan_send(libvchan_t *ctrl, const void *data, size_t size);

/*
 * Stream read: up to `size` bytes of the data there, including data left
 * after the peer closed; blocking mode waits for some, non-blocking
 * returns 0. -1 once the peer closed and nothing is left.
 */
int libvchan_read(libvchan_t *ctrl, void *data, size_t size);

/*
 * Packet receive: exactly `size` bytes or nothing (non-blocking: 0 if
 * fewer are there). -1 if size exceeds the ring, or if the peer closed
 * with fewer than `size` bytes left.
 */
int libvchan_recv(libvchan_t *ctrl, void *data, size_t size);

/*
 * Waits for an event (data, space, connect, close) and consumes it; does
 * not block when the fd from libvchan_fd_for_select() is readable.
 * 0, or -1 on error.
 */
int libvchan_wait(libvchan_t *ctrl);

/* Closes this end (the peer sees VCHAN_DISCONNECTED) and frees `ctrl`. */
void libvchan_close(libvchan_t *ctrl);

/* The fd to poll for readability before libvchan_wait(). */
EVTCHN libvchan_fd_for_select(libvchan_t *ctrl);

/* VCHAN_CONNECTED, VCHAN_WAITING or VCHAN_DISCONNECTED. */
int libvchan_is_open(libvchan_t *ctrl);

/* Bytes ready to read now. */
int libvchan_data_ready(libvchan_t *ctrl);

/* Bytes that can be written now without waiting. */
int libvchan_buffer_space(libvchan_t *ctrl);

/*
 * Blocking (the default) or non-blocking I/O; for a connected vchan (an
 * async client passes the mode to libvchan_client_init_async_finish()).
 */
void libvchan_set_blocking(libvchan_t *ctrl, bool blocking);

#ifdef __cplusplus
}
#endif

#endif /* LIBVCHAN_H */

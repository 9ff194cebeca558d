/* pgguard._relay: the native relay, one epoll thread pumping bytes for many sessions.
 *
 * Theory
 * ------
 * A ``Relay`` owns one thread that runs an epoll loop with the GIL released. ``Relay.add``
 * hands it the two file descriptors of a session that has passed its first ReadyForQuery
 * (the client's and the server's) and returns a ``Session``. From then on the thread alone
 * touches the session's sockets, buffers and framing state; the asyncio side only
 *
 *   - reads the session's counters (bytes each way, last activity, the server's last
 *     ReadyForQuery status), which the thread stores with atomic writes;
 *   - queues commands (write to one side, close one side after flushing, abort one side),
 *     which the thread picks up after a write to its wake eventfd;
 *   - drains events (one side closed: end of file, an errno, or on request) after the
 *     thread writes to the notification eventfd that the asyncio loop watches.
 *
 * Each direction has one output buffer (allocated only while bytes are pending, so an idle
 * session holds none). A side is read, up to ``bufsize`` bytes at a time, only when the
 * peer's buffer is empty: what one read brings either goes straight into the peer's socket
 * or waits in that buffer, which therefore never holds more than ``bufsize`` bytes (plus a
 * take-back). Back-pressure by not reading, as PgBouncer does; one full read per turn
 * rather than topping the buffer up keeps the system calls per megabyte low under COPY.
 *
 * The server's stream is framed (type byte, Int32 length) to know, at no copy, where each
 * message ends: a ReadyForQuery sets the status to its transaction byte (I, T or E), a
 * NotificationResponse, NoticeResponse or ParameterStatus keeps it, anything else clears it
 * to 0 (busy), as does any chunk from the client other than a bare Terminate. A write to
 * the client side while the session is live (take-back: an ErrorResponse FATAL) goes in at
 * the next message boundary of the server's stream: a partial message the client has not
 * received any byte of is dropped, one already partly sent is completed first; whatever the
 * server sends after it is discarded.
 *
 * Keep ([pool], ``add(..., keep=True)``): a session whose server side is reused. A lone
 * Terminate from the client while the server's last ReadyForQuery said idle ('I') is not
 * forwarded, and when the client side closes with the server idle and nothing pending for
 * it, the server's stream at a message boundary and none of it dropped after a take-back, the
 * server's descriptor leaves epoll unclosed and the client-closed event (final, detail
 * RELEASED) hands it back to the asyncio side, which resets and reuses the session.
 *
 * Lifetime: the relay holds a reference to each Session (taken in add, with the GIL) and to
 * each queued command's Session; it gives them back through ``events()`` (with the GIL), the
 * session's reference with the event that reports its second side closed. The thread never
 * touches a Python object.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define EV_CLIENT_CLOSED 1
#define EV_BACKEND_CLOSED 2
#define DETAIL_REQUESTED (-1) /* closed because the asyncio side asked */
#define DETAIL_RELEASED (-2)  /* client closed; the server's fd handed back open (keep) */

enum { CMD_ADD, CMD_WRITE, CMD_CLOSE, CMD_ABORT, CMD_STOP };

typedef struct Session Session;
typedef struct Relay Relay;

typedef struct End {
    int fd;          /* -1 once closed */
    int is_client;
    uint32_t mask;   /* current epoll interest */
    int registered;
    char *buf;       /* pending output to this fd: buf[start:end] */
    size_t start, end, cap;
    int close_req;   /* close once the output is flushed */
    Session *s;
} End;

struct Session {
    PyObject_HEAD
    PyObject *context;
    Relay *relay;
    End c, b;
    /* Read by the asyncio side with atomic loads. */
    uint64_t bytes_in, bytes_out;
    int64_t last_ns;
    int status;
    /* Framing of the server's stream (relay thread only). */
    uint32_t need;       /* body bytes left in the current message */
    uint8_t hdr[5];
    uint8_t hlen;
    uint8_t type;
    int broken;          /* a length below 4: stop framing, boundaries are chunk edges */
    uint64_t b_total;    /* bytes forwarded from the server */
    uint64_t b_boundary; /* stream offset of the last message boundary */
    /* Take-back (relay thread only). */
    char *inject;
    size_t inject_len;
    int discard;         /* the injection is written: drop what the server sends */
    int client_x;        /* the client's last chunk ended with a Terminate */
    int keep;            /* [pool]: a client leaving an idle session hands the server side back */
    int dropped;         /* server bytes were discarded after a take-back */
    int live;            /* in the relay's list */
    Session *next, *prev;
};

typedef struct Cmd {
    int type;
    int client;          /* which side */
    Session *s;
    char *data;
    size_t len;
    struct Cmd *next;
} Cmd;

typedef struct Event {
    Session *s;
    int kind;            /* 0: only give back a command's reference */
    int detail;
    int final;
} Event;

struct Relay {
    PyObject_HEAD
    int epfd, wakefd, notifyfd;
    size_t bufsize;
    pthread_t thread;
    int running;
    pthread_mutex_t lock;
    Cmd *cmd_head, *cmd_tail;
    Event *events;
    size_t nevents, capevents;
    int notified;        /* an unread write is pending on notifyfd */
    Session *live;       /* sessions not fully closed (under lock) */
    Event *local;        /* relay thread only: events of the current batch */
    size_t nlocal, caplocal;
    char *scratch;       /* relay thread only */
    int64_t now;
    uint64_t sessions;   /* live sessions, for the asyncio side */
};

static PyTypeObject SessionType;
static PyTypeObject RelayType;

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static size_t pending(const End *e) { return e->end - e->start; }

/* ------------------------------------------------------------ relay thread */

/* Events wait in the thread's own list until the end of the batch: a session whose second
 * side closed may be freed by the asyncio side as soon as its event is published, and the
 * thread may still touch it until then. */
static void post(Relay *r, Session *s, int kind, int detail, int final)
{
    if (r->nlocal == r->caplocal) {
        size_t cap = r->caplocal ? r->caplocal * 2 : 64;
        Event *ev;
        while ((ev = realloc(r->local, cap * sizeof(Event))) == NULL)
            usleep(1000); /* out of memory: an event must not be lost (it releases a slot) */
        r->local = ev;
        r->caplocal = cap;
    }
    r->local[r->nlocal++] = (Event){s, kind, detail, final};
}

static void publish(Relay *r)
{
    if (r->nlocal == 0)
        return;
    pthread_mutex_lock(&r->lock);
    if (r->nevents + r->nlocal > r->capevents) {
        size_t cap = r->capevents ? r->capevents : 64;
        while (cap < r->nevents + r->nlocal)
            cap *= 2;
        Event *ev;
        while ((ev = realloc(r->events, cap * sizeof(Event))) == NULL)
            usleep(1000);
        r->events = ev;
        r->capevents = cap;
    }
    memcpy(r->events + r->nevents, r->local, r->nlocal * sizeof(Event));
    r->nevents += r->nlocal;
    r->nlocal = 0;
    int wake = !r->notified;
    r->notified = 1;
    pthread_mutex_unlock(&r->lock);
    if (wake) {
        uint64_t one = 1;
        ssize_t n = write(r->notifyfd, &one, sizeof one);
        (void)n;
    }
}

static int append(End *e, const char *p, size_t n);
static void flush(Relay *r, End *e);

static void end_close(Relay *r, End *e, int detail)
{
    if (e->fd < 0)
        return;
    Session *s = e->s;
    if (e->registered)
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, e->fd, NULL);
    close(e->fd);
    e->fd = -1;
    e->registered = 0;
    free(e->buf);
    e->buf = NULL;
    e->start = e->end = e->cap = 0;
    End *other = e->is_client ? &s->b : &s->c;
    if (e->is_client && s->keep && other->fd >= 0 && !other->close_req && pending(other) == 0
        && !s->broken && s->need == 0 && s->hlen == 0 && !s->dropped
        && __atomic_load_n(&s->status, __ATOMIC_RELAXED) == 'I') {
        /* [pool] The client left a session idle outside a transaction: the server side goes
         * back to the asyncio side open (it resets and reuses it), with nothing pending. */
        if (other->registered)
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, other->fd, NULL);
        other->registered = 0;
        other->fd = -1;
        free(other->buf);
        other->buf = NULL;
        other->start = other->end = other->cap = 0;
        detail = DETAIL_RELEASED;
    }
    int final = other->fd < 0;
    if (e->is_client) {
        free(s->inject);
        s->inject = NULL;
        s->inject_len = 0;
    } else if (s->inject && other->fd >= 0) {
        /* No boundary will come now: drop the partial message if the client has none of
         * it, and write the take-back in any case. */
        uint64_t partial = s->b_total - s->b_boundary;
        if (!s->broken && partial && partial <= pending(other))
            other->end -= (size_t)partial;
        (void)append(other, s->inject, s->inject_len); /* on ENOMEM: close without it */
        free(s->inject);
        s->inject = NULL;
        s->inject_len = 0;
    }
    if (final && s->live) {
        pthread_mutex_lock(&r->lock);
        s->live = 0;
        if (s->prev) s->prev->next = s->next; else r->live = s->next;
        if (s->next) s->next->prev = s->prev;
        pthread_mutex_unlock(&r->lock);
        __atomic_sub_fetch(&r->sessions, 1, __ATOMIC_RELAXED);
    }
    post(r, s, e->is_client ? EV_CLIENT_CLOSED : EV_BACKEND_CLOSED, detail, final);
    if (e->is_client && !final && !s->client_x && !other->close_req) {
        /* Tell the server the client left (a Terminate, unless the client's last bytes were
         * one), as proxy.ClientConnection.client_lost does, without a round trip to it. */
        static const char terminate[5] = {'X', 0, 0, 0, 4};
        if (append(other, terminate, 5) == 0)
            flush(r, other);
    }
}

/* Append to an end's output buffer (growing it; the caller bounds what it reads). */
static int append(End *e, const char *p, size_t n)
{
    if (n == 0)
        return 0;
    if (e->start && e->end + n > e->cap) {
        memmove(e->buf, e->buf + e->start, e->end - e->start);
        e->end -= e->start;
        e->start = 0;
    }
    if (e->end + n > e->cap) {
        size_t cap = e->end + n;
        if (cap < 4096) cap = 4096;
        char *buf = realloc(e->buf, cap);
        if (buf == NULL)
            return -1;
        e->buf = buf;
        e->cap = cap;
    }
    memcpy(e->buf + e->end, p, n);
    e->end += n;
    return 0;
}

static void flush(Relay *r, End *e)
{
    while (e->fd >= 0 && pending(e)) {
        ssize_t n = send(e->fd, e->buf + e->start, pending(e), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            end_close(r, e, errno);
            return;
        }
        e->start += (size_t)n;
    }
    if (e->fd >= 0 && pending(e) == 0) {
        free(e->buf);
        e->buf = NULL;
        e->start = e->end = e->cap = 0;
        if (e->close_req && !(e->is_client && e->s->inject))
            end_close(r, e, DETAIL_REQUESTED);
    }
}

/* Send what was read straight to the peer when nothing is queued before it; keep the rest. */
static void forward(Relay *r, End *dst, const char *p, size_t n)
{
    if (dst->fd < 0 || n == 0)
        return;
    if (pending(dst) == 0) {
        ssize_t k;
        do {
            k = send(dst->fd, p, n, MSG_NOSIGNAL);
        } while (k < 0 && errno == EINTR);
        if (k < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                end_close(r, dst, errno);
                return;
            }
            k = 0;
        }
        p += k;
        n -= (size_t)k;
    }
    if (n && append(dst, p, n) < 0)
        end_close(r, dst, ENOMEM);
}

static void set_status(Session *s, int status)
{
    __atomic_store_n(&s->status, status, __ATOMIC_RELAXED);
}

/* Frame bytes from the server; returns how many of them to forward (all of them unless a
 * take-back is waiting for the end of the current message, which this chunk reaches). */
static size_t frame_backend(Session *s, const unsigned char *p, size_t n, int *at_boundary)
{
    size_t i = 0;
    *at_boundary = 0;
    if (s->broken) {
        if (s->inject)
            *at_boundary = 1;
        return n;
    }
    while (i < n) {
        if (s->need == 0 && s->hlen < 5) {
            s->hdr[s->hlen++] = p[i++];
            if (s->hlen < 5)
                continue;
            uint32_t len = ((uint32_t)s->hdr[1] << 24) | ((uint32_t)s->hdr[2] << 16) |
                           ((uint32_t)s->hdr[3] << 8) | s->hdr[4];
            s->type = s->hdr[0];
            if (len < 4) { /* not PostgreSQL's protocol: stop framing */
                s->broken = 1;
                set_status(s, 0);
                if (s->inject)
                    *at_boundary = 1;
                return n;
            }
            s->need = len - 4;
            if (s->need)
                continue;
        } else {
            size_t take = s->need < n - i ? s->need : n - i;
            i += take;
            s->need -= (uint32_t)take;
            if (s->need)
                continue;
            if (s->type == 'Z') {
                set_status(s, p[i - 1]);
                goto complete;
            }
        }
        if (s->type != 'A' && s->type != 'N' && s->type != 'S')
            set_status(s, 0);
    complete:
        s->hlen = 0;
        s->b_boundary = s->b_total + i;
        if (s->inject) {
            *at_boundary = 1;
            return i;
        }
    }
    return n;
}

/* Queue the take-back bytes at the boundary reached; from now on drop the server's bytes. */
static void inject_now(Relay *r, Session *s)
{
    End *c = &s->c;
    if (c->fd >= 0 && append(c, s->inject, s->inject_len) < 0) {
        end_close(r, c, ENOMEM);
        return;
    }
    free(s->inject);
    s->inject = NULL;
    s->inject_len = 0;
    s->discard = 1;
}

/* A take-back was asked: inject now if the stream is at a boundary or the partial message
 * has not reached the client at all (then drop it); otherwise wait for the boundary. */
static void try_inject(Relay *r, Session *s)
{
    End *c = &s->c;
    if (s->discard) { /* a second take-back: the stream already ended at a boundary */
        if (c->fd >= 0 && append(c, s->inject, s->inject_len) < 0)
            end_close(r, c, ENOMEM);
        free(s->inject);
        s->inject = NULL;
        s->inject_len = 0;
        return;
    }
    int mid = s->broken ? 0 : (s->need != 0 || s->hlen != 0);
    if (mid) {
        uint64_t partial = s->b_total - s->b_boundary;
        if (partial <= pending(c))
            c->end -= (size_t)partial; /* the client has none of it: drop it */
        else if (s->b.fd >= 0)
            return; /* the client has part of it already: finish the message first */
        /* else the server is gone (its end was closed before this take-back was asked):
         * no boundary will come, so the take-back goes out now, as end_close does. */
    }
    inject_now(r, s);
}

static void handle_read(Relay *r, End *src)
{
    Session *s = src->s;
    End *dst = src->is_client ? &s->b : &s->c;
    int drop = dst->fd < 0 || (!src->is_client && s->discard);
    if (!drop && pending(dst))
        return; /* read again once the peer took everything */
    char *p = r->scratch;
    ssize_t n = recv(src->fd, p, r->bufsize, 0);
    if (n == 0) {
        end_close(r, src, 0);
        return;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        end_close(r, src, errno);
        return;
    }
    if (drop) {
        if (!src->is_client)
            s->dropped = 1;
        return;
    }
    __atomic_store_n(&s->last_ns, r->now, __ATOMIC_RELAXED);
    if (src->is_client) {
        __atomic_add_fetch(&s->bytes_in, (uint64_t)n, __ATOMIC_RELAXED);
        /* A Terminate is no query: the server reads it at once (see proxy._Pump). */
        static const char terminate[5] = {'X', 0, 0, 0, 4};
        s->client_x = n >= 5 && memcmp(p + n - 5, terminate, 5) == 0;
        if (s->keep && n == 5 && s->client_x && __atomic_load_n(&s->status, __ATOMIC_RELAXED) == 'I') {
            end_close(r, src, 0); /* [pool] a goodbye from an idle client: the server keeps its session */
            return;
        }
        if (!s->client_x)
            set_status(s, 0);
        forward(r, dst, p, (size_t)n);
        return;
    }
    int boundary;
    size_t fwd = frame_backend(s, (unsigned char *)p, (size_t)n, &boundary);
    s->b_total += fwd;
    __atomic_add_fetch(&s->bytes_out, (uint64_t)fwd, __ATOMIC_RELAXED);
    forward(r, dst, p, fwd);
    if (boundary && s->inject)
        inject_now(r, s);
    if (dst->fd >= 0)
        flush(r, dst);
}

static void update_mask(Relay *r, End *e)
{
    if (e->fd < 0)
        return;
    Session *s = e->s;
    End *peer = e->is_client ? &s->b : &s->c;
    uint32_t want = 0;
    if (!e->close_req) {
        if (e->is_client) {
            if (peer->fd >= 0 && pending(peer) == 0)
                want |= EPOLLIN;
        } else if (peer->fd < 0 || s->discard || pending(peer) == 0) {
            want |= EPOLLIN;
        }
    }
    if (pending(e))
        want |= EPOLLOUT;
    if (e->registered && want == e->mask)
        return;
    struct epoll_event ev = {.events = want, .data.ptr = e};
    if (epoll_ctl(r->epfd, e->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, e->fd, &ev) < 0) {
        end_close(r, e, errno);
        return;
    }
    e->registered = 1;
    e->mask = want;
}

static void update_masks(Relay *r, Session *s)
{
    update_mask(r, &s->c);
    update_mask(r, &s->b);
}

static void handle_event(Relay *r, End *e, uint32_t events)
{
    Session *s = e->s;
    if (events & EPOLLOUT)
        flush(r, e);
    if (e->fd >= 0 && (events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
        if (e->mask & EPOLLIN) {
            handle_read(r, e);
        } else if (events & (EPOLLHUP | EPOLLERR)) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            end_close(r, e, err);
        }
    }
    End *peer = e->is_client ? &s->b : &s->c;
    if (peer->fd >= 0 && pending(peer))
        flush(r, peer);
    update_masks(r, s);
}

static void run_command(Relay *r, Cmd *cmd)
{
    Session *s = cmd->s;
    End *e = cmd->client ? &s->c : &s->b;
    switch (cmd->type) {
    case CMD_ADD:
        /* The session's first command: its sockets join the epoll set here, in the relay
         * thread, so no event of one side can be handled before the other side is in (a
         * client reset at once used to end, or release, a server side not registered yet,
         * whose late registration then pointed at a freed session). The server side first:
         * a failure there ends the session with the client side not yet read. */
        update_mask(r, &s->b);
        update_mask(r, &s->c);
        break;
    case CMD_WRITE:
        if (e->fd < 0)
            break;
        if (cmd->client) { /* take-back: at the next message boundary of the server's stream */
            char *more = realloc(s->inject, s->inject_len + cmd->len);
            if (more == NULL) {
                end_close(r, e, ENOMEM);
                break;
            }
            memcpy(more + s->inject_len, cmd->data, cmd->len);
            s->inject = more;
            s->inject_len += cmd->len;
            try_inject(r, s);
        } else if (append(e, cmd->data, cmd->len) < 0) {
            end_close(r, e, ENOMEM);
            break;
        }
        flush(r, e);
        update_masks(r, s);
        break;
    case CMD_CLOSE:
        if (e->fd < 0)
            break;
        e->close_req = 1;
        flush(r, e);
        update_masks(r, s);
        break;
    case CMD_ABORT:
        end_close(r, e, DETAIL_REQUESTED);
        update_masks(r, s);
        break;
    }
}

static void *relay_main(void *arg)
{
    Relay *r = arg;
    struct epoll_event evs[128];
    for (;;) {
        int n = epoll_wait(r->epfd, evs, 128, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        r->now = mono_ns();
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) { /* the wake eventfd: commands */
                uint64_t v;
                ssize_t k = read(r->wakefd, &v, sizeof v);
                (void)k;
                pthread_mutex_lock(&r->lock);
                Cmd *cmd = r->cmd_head;
                r->cmd_head = r->cmd_tail = NULL;
                pthread_mutex_unlock(&r->lock);
                int stop = 0;
                while (cmd) {
                    Cmd *next = cmd->next;
                    if (cmd->type == CMD_STOP) {
                        stop = 1;
                    } else {
                        run_command(r, cmd);
                        post(r, cmd->s, 0, 0, 0); /* give back the command's reference */
                    }
                    free(cmd->data);
                    free(cmd);
                    cmd = next;
                }
                if (stop) {
                    for (;;) {
                        pthread_mutex_lock(&r->lock);
                        Session *s = r->live;
                        pthread_mutex_unlock(&r->lock);
                        if (s == NULL)
                            break;
                        end_close(r, &s->c, DETAIL_REQUESTED);
                        end_close(r, &s->b, DETAIL_REQUESTED);
                    }
                    publish(r);
                    return NULL;
                }
                continue;
            }
            End *e = evs[i].data.ptr;
            if (e->fd < 0)
                continue; /* closed earlier in this batch */
            handle_event(r, e, evs[i].events);
        }
        publish(r);
    }
    publish(r);
    return NULL;
}

/* ------------------------------------------------------------- Python side */

static int enqueue(Relay *r, int type, Session *s, int client, const char *data, size_t len)
{
    if (!r->running) {
        PyErr_SetString(PyExc_RuntimeError, "relay is closed");
        return -1;
    }
    Cmd *cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (len) {
        cmd->data = malloc(len);
        if (cmd->data == NULL) {
            free(cmd);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(cmd->data, data, len);
        cmd->len = len;
    }
    cmd->type = type;
    cmd->s = s;
    cmd->client = client;
    if (s)
        Py_INCREF(s); /* given back through events() once the thread ran the command */
    pthread_mutex_lock(&r->lock);
    int was_empty = r->cmd_head == NULL;
    if (r->cmd_tail) r->cmd_tail->next = cmd; else r->cmd_head = cmd;
    r->cmd_tail = cmd;
    pthread_mutex_unlock(&r->lock);
    if (was_empty) {
        uint64_t one = 1;
        ssize_t n = write(r->wakefd, &one, sizeof one);
        (void)n;
    }
    return 0;
}

static PyObject *Session_cmd(Session *self, int type, int client, PyObject *arg)
{
    if (self->relay == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "session not added to a relay");
        return NULL;
    }
    Py_buffer view = {0};
    if (arg && PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = enqueue(self->relay, type, self, client, arg ? view.buf : NULL, arg ? (size_t)view.len : 0);
    if (arg)
        PyBuffer_Release(&view);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Session_send_client(Session *self, PyObject *data) { return Session_cmd(self, CMD_WRITE, 1, data); }
static PyObject *Session_send_backend(Session *self, PyObject *data) { return Session_cmd(self, CMD_WRITE, 0, data); }
static PyObject *Session_close_client(Session *self, PyObject *unused) { return Session_cmd(self, CMD_CLOSE, 1, NULL); }
static PyObject *Session_close_backend(Session *self, PyObject *unused) { return Session_cmd(self, CMD_CLOSE, 0, NULL); }
static PyObject *Session_abort_client(Session *self, PyObject *unused) { return Session_cmd(self, CMD_ABORT, 1, NULL); }
static PyObject *Session_abort_backend(Session *self, PyObject *unused) { return Session_cmd(self, CMD_ABORT, 0, NULL); }

static PyObject *Session_get_bytes_in(Session *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->bytes_in, __ATOMIC_RELAXED));
}

static PyObject *Session_get_bytes_out(Session *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->bytes_out, __ATOMIC_RELAXED));
}

static PyObject *Session_get_last_active(Session *self, void *closure)
{
    return PyFloat_FromDouble((double)__atomic_load_n(&self->last_ns, __ATOMIC_RELAXED) / 1e9);
}

static PyObject *Session_get_status(Session *self, void *closure)
{
    return PyLong_FromLong(__atomic_load_n(&self->status, __ATOMIC_RELAXED));
}

static void Session_dealloc(Session *self)
{
    /* Only reached once the relay gave back its reference: both sides are closed. */
    Py_CLEAR(self->context);
    Py_XDECREF((PyObject *)self->relay);
    free(self->c.buf);
    free(self->b.buf);
    free(self->inject);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Session_methods[] = {
    {"send_client", (PyCFunction)Session_send_client, METH_O,
     "Write to the client at the next message boundary of the server's stream (take-back)."},
    {"send_backend", (PyCFunction)Session_send_backend, METH_O, "Write to the server."},
    {"close_client", (PyCFunction)Session_close_client, METH_NOARGS,
     "Stop reading the client; close it once its output is written."},
    {"close_backend", (PyCFunction)Session_close_backend, METH_NOARGS,
     "Stop reading the server; close it once its output is written."},
    {"abort_client", (PyCFunction)Session_abort_client, METH_NOARGS, "Close the client now."},
    {"abort_backend", (PyCFunction)Session_abort_backend, METH_NOARGS, "Close the server now."},
    {NULL}};

static PyGetSetDef Session_getset[] = {
    {"bytes_in", (getter)Session_get_bytes_in, NULL, "bytes relayed from the client", NULL},
    {"bytes_out", (getter)Session_get_bytes_out, NULL, "bytes relayed to the client", NULL},
    {"last_active", (getter)Session_get_last_active, NULL,
     "time.monotonic() of the last bytes either way", NULL},
    {"status", (getter)Session_get_status, NULL,
     "the server's last ReadyForQuery status (I, T, E as an int) while idle, 0 while busy", NULL},
    {NULL}};

static PyMemberDef Session_members[] = {
    {"context", T_OBJECT, offsetof(Session, context), 0, "the object given to Relay.add"},
    {NULL}};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgguard._relay.Session",
    .tp_basicsize = sizeof(Session),
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One relayed session (made by Relay.add).",
    .tp_methods = Session_methods,
    .tp_getset = Session_getset,
    .tp_members = Session_members,
};

static int Relay_init(Relay *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bufsize", NULL};
    Py_ssize_t bufsize = 262144;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &bufsize))
        return -1;
    if (bufsize < 16 || bufsize > (1 << 26)) {
        PyErr_SetString(PyExc_ValueError, "bufsize out of range");
        return -1;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "relay already running");
        return -1;
    }
    self->bufsize = (size_t)bufsize;
    self->scratch = malloc(self->bufsize);
    if (self->scratch == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notifyfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->epfd < 0 || self->wakefd < 0 || self->notifyfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wakefd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_mutex_init(&self->lock, NULL);
    /* The thread gets a small stack: it needs a few kilobytes (the epoll batch). */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    /* Signals go to the interpreter's thread (its handlers, and loop.add_signal_handler):
     * the relay thread starts with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&self->thread, &attr, relay_main, self);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->running = 1;
    return 0;
}

static PyObject *Relay_fileno(Relay *self, PyObject *unused)
{
    return PyLong_FromLong(self->notifyfd);
}

static PyObject *Relay_add(Relay *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client_fd", "backend_fd", "context", "status", "bytes_in", "bytes_out", "keep", NULL};
    int cfd, bfd, status = 'I', keep = 0;
    PyObject *context = Py_None;
    unsigned long long bin = 0, bout = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii|O$iKKp", kwlist, &cfd, &bfd, &context,
                                     &status, &bin, &bout, &keep))
        return NULL;
    if (!self->running) {
        PyErr_SetString(PyExc_RuntimeError, "relay is closed");
        return NULL;
    }
    Session *s = PyObject_New(Session, &SessionType);
    if (s == NULL)
        return NULL;
    memset((char *)s + sizeof(PyObject), 0, sizeof(Session) - sizeof(PyObject));
    s->c = (End){.fd = cfd, .is_client = 1, .s = s};
    s->b = (End){.fd = bfd, .is_client = 0, .s = s};
    s->status = status;
    s->keep = keep;
    s->bytes_in = bin;
    s->bytes_out = bout;
    s->last_ns = mono_ns();
    Py_INCREF(context);
    s->context = context;
    Py_INCREF(self);
    s->relay = self;
    Py_INCREF(s); /* the relay's own reference, given back with the final event */
    pthread_mutex_lock(&self->lock);
    s->live = 1;
    s->next = self->live;
    if (self->live) self->live->prev = s;
    self->live = s;
    pthread_mutex_unlock(&self->lock);
    __atomic_add_fetch(&self->sessions, 1, __ATOMIC_RELAXED);
    /* Registered by the relay thread itself (CMD_ADD, the session's first command): from
     * here on only that thread touches the session's sockets. */
    if (enqueue(self, CMD_ADD, s, 0, NULL, 0) < 0) {
        /* Not handed over (the relay is closed): the caller still owns the descriptors. */
        pthread_mutex_lock(&self->lock);
        s->live = 0;
        if (s->prev) s->prev->next = s->next; else self->live = s->next;
        if (s->next) s->next->prev = s->prev;
        pthread_mutex_unlock(&self->lock);
        __atomic_sub_fetch(&self->sessions, 1, __ATOMIC_RELAXED);
        s->c.fd = s->b.fd = -1;
        Py_DECREF(s);
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static PyObject *Relay_events(Relay *self, PyObject *unused)
{
    uint64_t v;
    ssize_t k = read(self->notifyfd, &v, sizeof v);
    (void)k;
    pthread_mutex_lock(&self->lock);
    Event *events = self->events;
    size_t n = self->nevents;
    self->events = NULL;
    self->nevents = self->capevents = 0;
    self->notified = 0;
    pthread_mutex_unlock(&self->lock);
    PyObject *out = PyList_New(0);
    for (size_t i = 0; i < n; i++) {
        Session *s = events[i].s;
        if (events[i].kind != 0 && out != NULL) {
            PyObject *item = Py_BuildValue("(OiiO)", s->context, events[i].kind, events[i].detail,
                                           events[i].final ? Py_True : Py_False);
            if (item == NULL || PyList_Append(out, item) < 0)
                Py_CLEAR(out);
            Py_XDECREF(item);
        }
        if (events[i].final) {
            Py_CLEAR(s->context);
            Py_DECREF(s); /* the relay's reference */
        }
        if (events[i].kind == 0)
            Py_DECREF(s); /* a command's reference */
    }
    free(events);
    return out;
}

static void relay_stop(Relay *self)
{
    if (!self->running)
        return;
    /* Queue the stop directly (enqueue refuses once running is cleared). */
    Cmd *cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL)
        return;
    cmd->type = CMD_STOP;
    pthread_mutex_lock(&self->lock);
    if (self->cmd_tail) self->cmd_tail->next = cmd; else self->cmd_head = cmd;
    self->cmd_tail = cmd;
    pthread_mutex_unlock(&self->lock);
    uint64_t one = 1;
    ssize_t n = write(self->wakefd, &one, sizeof one);
    (void)n;
    self->running = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
}

static PyObject *Relay_close(Relay *self, PyObject *unused)
{
    relay_stop(self);
    Py_RETURN_NONE;
}

static PyObject *Relay_get_sessions(Relay *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->sessions, __ATOMIC_RELAXED));
}

static void Relay_dealloc(Relay *self)
{
    /* Sessions hold a reference to their relay, so none is live here. */
    relay_stop(self);
    if (self->epfd > 0) close(self->epfd);
    if (self->wakefd > 0) close(self->wakefd);
    if (self->notifyfd > 0) close(self->notifyfd);
    free(self->scratch);
    free(self->events);
    free(self->local);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Relay *self = (Relay *)type->tp_alloc(type, 0);
    if (self) {
        self->epfd = self->wakefd = self->notifyfd = -1;
    }
    return (PyObject *)self;
}

static PyMethodDef Relay_methods[] = {
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS,
     "The eventfd that becomes readable when events() has something."},
    {"add", (PyCFunction)(void (*)(void))Relay_add, METH_VARARGS | METH_KEYWORDS,
     "add(client_fd, backend_fd, context=None, *, status=73, bytes_in=0, bytes_out=0, keep=False) -> Session\n"
     "Relay a session; the relay owns (and will close) both descriptors from now on. keep: a "
     "client leaving while the server is idle ('I', nothing pending) hands the server's "
     "descriptor back open (event detail RELEASED) instead of closing it."},
    {"events", (PyCFunction)Relay_events, METH_NOARGS,
     "Drain the events: a list of (context, kind, detail, final); kind 1 client closed, "
     "2 server closed; detail 0 end of file, an errno, -1 closed on request, or -2 (client "
     "closed, keep) the server's descriptor is the caller's again; final: "
     "both sides are closed now."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS,
     "Stop the thread, closing every live session (their events stay to be drained)."},
    {NULL}};

static PyGetSetDef Relay_getset[] = {
    {"sessions", (getter)Relay_get_sessions, NULL, "sessions not fully closed yet", NULL},
    {NULL}};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgguard._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relay(bufsize=262144): one epoll thread relaying many sessions.",
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
    .tp_init = (initproc)Relay_init,
    .tp_new = Relay_new,
};

static struct PyModuleDef relaymodule = {
    PyModuleDef_HEAD_INIT, "pgguard._relay",
    "pgguard's native relay: one epoll thread pumping the bytes of many sessions.", -1, NULL};

PyMODINIT_FUNC PyInit__relay(void)
{
    if (PyType_Ready(&SessionType) < 0 || PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relaymodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0)
        return NULL;
    Py_INCREF(&SessionType);
    PyModule_AddObject(m, "Session", (PyObject *)&SessionType);
    PyModule_AddIntConstant(m, "CLIENT_CLOSED", EV_CLIENT_CLOSED);
    PyModule_AddIntConstant(m, "BACKEND_CLOSED", EV_BACKEND_CLOSED);
    PyModule_AddIntConstant(m, "REQUESTED", DETAIL_REQUESTED);
    PyModule_AddIntConstant(m, "RELEASED", DETAIL_RELEASED);
    return m;
}

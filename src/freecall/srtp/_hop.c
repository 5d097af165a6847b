/* freecall.srtp._hop: the media bridge's per-packet hop in C (issue 6).
 *
 * A `Hop` is one direction of one secure stream: phone->net (SRTP protect, RFC 3711 section
 * 3.3) or net->phone (unprotect, section 3.4), then one sendto(2). It is installed as the
 * socket protocol's `datagram_received`, so the event loop calls C directly with (data, addr).
 * Everything that is not the common case goes to a Python fallback with the same arguments:
 * the bridge's slow paths (ZRTP, STUN, RTCP on the RTP port, authentication failures,
 * oversized packets) stay in Python and unchanged.
 *
 * libsrtp is reached through pylibsrtp's own session: its srtp_t and pylibsrtp's bundled
 * srtp_protect/srtp_unprotect are passed in as integers, and the Hop keeps a reference to the
 * pylibsrtp Session that owns the context. The libsrtp 2.x signature is declared here, so no
 * libsrtp headers or library are needed at build time. The GIL is held throughout; the hop
 * never logs and exposes neither the context nor any key material.
 */
#define _GNU_SOURCE /* recvmmsg */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* libsrtp 2.x: srtp_err_status_t srtp_protect(srtp_t ctx, void *rtp_hdr, int *len_ptr);
 * and the same for srtp_unprotect. 0 is srtp_err_status_ok. */
typedef int (*srtp_fn)(void *ctx, void *hdr, int *len);

/* pylibsrtp's session buffer is 1500 octets and it refuses to protect more than that minus
 * SRTP_MAX_TRAILER_LEN (tag 16 + MKI 128); the hop keeps the same limits, so that anything
 * longer reaches the Python path, which refuses it the same way. */
#define HOP_MAX_PACKET 1500
#define HOP_MAX_TRAILER (16 + 128)
#define RTP_HEADER_LEN 12

/* RFC 3550 appendix A.3, as freecall.srtp.rtp.ReceptionStats keeps it. */
#define RTP_SEQ_MOD 65536
#define MAX_DROPOUT 3000
#define MAX_MISORDER 100

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *session;  /* the pylibsrtp.Session that owns ctx: kept alive with the hop */
    PyObject *fallback; /* callable(data, addr): the Python path */
    PyObject *latch;    /* callable(addr) or NULL: an authenticated packet from a new source */
    PyObject *source;   /* the latched remote address (unprotect) or NULL */
    void *ctx;
    srtp_fn fn;
    int fd;
    int unprotect;
    struct sockaddr_storage dest;
    socklen_t dest_len;
    struct sockaddr_storage src; /* `source` as a sockaddr, for the Reader; src_len 0: none */
    socklen_t src_len;
    unsigned long long packets_in, bytes_in, packets_out, bytes_out, dropped, send_errors;
    /* RFC 3550 A.3 reception state (unprotect only) */
    long long max_seq, base_seq, cycles, bad_seq, received;
    long long expected_before, received_before, restarts;
    unsigned char buf[HOP_MAX_PACKET + HOP_MAX_TRAILER];
} Hop;

static PyObject *hop_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *);

/* -- addresses ------------------------------------------------------------------------------ */

/* (host, port) for IPv4 or (host, port, flowinfo, scope_id) for IPv6, as the loop reports
 * sources, into a sockaddr built once per target. */
static int
parse_addr(PyObject *addr, struct sockaddr_storage *out, socklen_t *out_len)
{
    if (!PyTuple_Check(addr) || (PyTuple_GET_SIZE(addr) != 2 && PyTuple_GET_SIZE(addr) != 4)) {
        PyErr_SetString(PyExc_ValueError, "address must be (host, port) or a 4-tuple");
        return -1;
    }
    const char *host = PyUnicode_AsUTF8(PyTuple_GET_ITEM(addr, 0));
    if (host == NULL)
        return -1;
    long port = PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port <= 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "bad port");
        return -1;
    }
    memset(out, 0, sizeof(*out));
    if (PyTuple_GET_SIZE(addr) == 2) {
        struct sockaddr_in *sin = (struct sockaddr_in *)out;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) {
            PyErr_SetString(PyExc_ValueError, "not an IPv4 address");
            return -1;
        }
        *out_len = sizeof(*sin);
        return 0;
    }
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
    unsigned long flow = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 2));
    if (flow == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    unsigned long scope = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 3));
    if (scope == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((unsigned short)port);
    sin6->sin6_flowinfo = htonl((uint32_t)flow);
    sin6->sin6_scope_id = (uint32_t)scope;
    if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1) {
        PyErr_SetString(PyExc_ValueError, "not an IPv6 address");
        return -1;
    }
    *out_len = sizeof(*sin6);
    return 0;
}

/* -- RFC 3550 appendix A.3 ------------------------------------------------------------------- */

static void
rx_init(Hop *h, long long seq)
{
    h->base_seq = seq;
    h->max_seq = seq;
    h->bad_seq = RTP_SEQ_MOD + 1; /* A.3: "so seq == bad_seq is false" */
    h->cycles = 0;
    h->received = 0;
}

/* A.3 update_seq without probation, restarts keeping earlier totals (see ReceptionStats). */
static void
rx_update(Hop *h, long long seq)
{
    if (h->max_seq < 0) {
        rx_init(h, seq);
        h->received = 1;
        return;
    }
    long long udelta = (seq - h->max_seq) & 0xFFFF;
    if (udelta < MAX_DROPOUT) {
        if (seq < h->max_seq)
            h->cycles += RTP_SEQ_MOD; /* wrapped */
        h->max_seq = seq;
    }
    else if (udelta <= RTP_SEQ_MOD - MAX_MISORDER) {
        if (seq == h->bad_seq) { /* two sequential packets after a jump: a restart */
            h->expected_before += h->cycles + h->max_seq - h->base_seq + 1;
            h->received_before += h->received;
            h->restarts += 1;
            rx_init(h, seq);
        }
        else {
            h->bad_seq = (seq + 1) & 0xFFFF;
            return;
        }
    }
    h->received += 1;
}

/* -- the hop ---------------------------------------------------------------------------------- */

/* The latched source, as a tuple for the loop's (data, addr) calls and as a sockaddr for the
 * Reader's, which compares before it makes any object. */
static int
set_source(Hop *self, PyObject *addr)
{
    if (addr == Py_None) {
        Py_CLEAR(self->source);
        self->src_len = 0;
        return 0;
    }
    if (parse_addr(addr, &self->src, &self->src_len) < 0)
        return -1;
    Py_XSETREF(self->source, Py_NewRef(addr));
    return 0;
}

static PyObject *
to_fallback(Hop *self, PyObject *data, PyObject *addr)
{
    if (self->fallback == NULL) /* cleared */
        Py_RETURN_NONE;
    PyObject *fallback = Py_NewRef(self->fallback); /* the call may drop the hop's own */
    PyObject *args[2] = {data, addr};
    PyObject *r = PyObject_Vectorcall(fallback, args, 2, NULL);
    Py_DECREF(fallback);
    return r;
}

static void
send_out(Hop *self, int len)
{
    ssize_t rc;
    do {
        rc = sendto(self->fd, self->buf, (size_t)len, 0, (struct sockaddr *)&self->dest,
                    self->dest_len);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        self->send_errors++; /* EAGAIN included: UDP may drop */
        return;
    }
    self->packets_out++;
    self->bytes_out += (unsigned long long)len;
}

/* What the hop did with one datagram. */
enum { HOP_DONE = 0, HOP_FALLBACK = 1, HOP_CHECK_SOURCE = 2 };

/* The hop on one datagram, without Python objects: HOP_DONE (sent, or dropped and counted),
 * HOP_FALLBACK (the Python path must see it: nothing was counted), or HOP_CHECK_SOURCE
 * (authenticated and sent by a hop that latches: the caller compares the source). */
static int
hop_run(Hop *self, const unsigned char *d, Py_ssize_t n)
{
    int len = (int)n;
    if (self->dest_len == 0)
        return HOP_FALLBACK;
    if (!self->unprotect) {
        /* phone->net: RTP version 2, a whole fixed header, not RTCP muxed on the RTP port
         * (RFC 5761 section 4: second octet 192-223), no longer than pylibsrtp accepts. */
        if (n < RTP_HEADER_LEN || (d[0] >> 6) != 2 || (d[1] > 191 && d[1] < 224)
            || n > HOP_MAX_PACKET - HOP_MAX_TRAILER)
            return HOP_FALLBACK;
        memcpy(self->buf, d, (size_t)n);
        if (self->fn(self->ctx, self->buf, &len) != 0) {
            self->dropped++; /* as the Python path: a packet libsrtp refuses is dropped */
            return HOP_DONE;
        }
        self->packets_in++;
        self->bytes_in += (unsigned long long)n;
        send_out(self, len);
        return HOP_DONE;
    }
    /* net->phone: anything that does not authenticate is the Python path's to classify
     * (ZRTP, STUN, SRTCP on the RTP port, forgeries, replays). */
    if (n < RTP_HEADER_LEN || n > HOP_MAX_PACKET)
        return HOP_FALLBACK;
    memcpy(self->buf, d, (size_t)n);
    if (self->fn(self->ctx, self->buf, &len) != 0)
        return HOP_FALLBACK;
    self->packets_in++;
    self->bytes_in += (unsigned long long)n;
    long long seq = (long long)d[2] << 8 | d[3];
    if (self->max_seq >= 0 && seq > self->max_seq && seq < self->max_seq + MAX_DROPOUT) {
        self->max_seq = seq; /* A.3's common case: in order, no wrap */
        self->received++;
    }
    else {
        rx_update(self, seq);
    }
    send_out(self, len);
    return self->latch != NULL ? HOP_CHECK_SOURCE : HOP_DONE;
}

static PyObject *
call_latch(Hop *self, PyObject *addr)
{
    /* authenticated from a new source: symmetric RTP moves the target */
    PyObject *latch = Py_NewRef(self->latch);
    PyObject *largs[1] = {addr};
    PyObject *r = PyObject_Vectorcall(latch, largs, 1, NULL);
    Py_DECREF(latch);
    return r;
}

static PyObject *
hop_vectorcall(PyObject *obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Hop *self = (Hop *)obj;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Hop is called with (data, addr)");
        return NULL;
    }
    PyObject *data = args[0], *addr = args[1];
    if (!PyBytes_CheckExact(data))
        return to_fallback(self, data, addr);
    int r = hop_run(self, (const unsigned char *)PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
    if (r == HOP_FALLBACK)
        return to_fallback(self, data, addr);
    if (r == HOP_CHECK_SOURCE && self->latch != NULL && self->source != addr) {
        int same = self->source != NULL ? PyObject_RichCompareBool(addr, self->source, Py_EQ) : 0;
        if (same < 0)
            return NULL;
        if (!same)
            return call_latch(self, addr);
    }
    Py_RETURN_NONE;
}

static int
hop_init(Hop *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"session", "ctx", "fn", "fd", "dest", "fallback",
                             "unprotect", "source", "latch", NULL};
    PyObject *session, *ctx, *fn, *dest, *fallback, *source = Py_None, *latch = Py_None;
    int fd, unprotect = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O!iOO|$pOO", kwlist, &session, &PyLong_Type,
                                     &ctx, &PyLong_Type, &fn, &fd, &dest, &fallback, &unprotect,
                                     &source, &latch))
        return -1;
    void *c = PyLong_AsVoidPtr(ctx);
    if (c == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "null SRTP context");
        return -1;
    }
    void *f = PyLong_AsVoidPtr(fn);
    if (f == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "null SRTP function");
        return -1;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return -1;
    }
    if (!PyCallable_Check(fallback) || (latch != Py_None && !PyCallable_Check(latch))) {
        PyErr_SetString(PyExc_TypeError, "fallback and latch must be callable");
        return -1;
    }
    if (parse_addr(dest, &self->dest, &self->dest_len) < 0)
        return -1;
    self->ctx = c;
    self->fn = (srtp_fn)f;
    self->fd = fd;
    self->unprotect = unprotect;
    Py_INCREF(session);
    Py_XSETREF(self->session, session);
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    Py_XSETREF(self->latch, latch == Py_None ? NULL : Py_NewRef(latch));
    if (set_source(self, source) < 0)
        return -1;
    self->max_seq = -1;
    self->bad_seq = RTP_SEQ_MOD + 1;
    return 0;
}

static PyObject *
hop_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    Hop *self = (Hop *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->vectorcall = hop_vectorcall;
        self->max_seq = -1;
        self->bad_seq = RTP_SEQ_MOD + 1;
    }
    return (PyObject *)self;
}

static int
hop_traverse(Hop *self, visitproc visit, void *arg)
{
    Py_VISIT(self->session);
    Py_VISIT(self->fallback);
    Py_VISIT(self->latch);
    Py_VISIT(self->source);
    return 0;
}

static int
hop_clear(Hop *self)
{
    Py_CLEAR(self->session);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->latch);
    Py_CLEAR(self->source);
    self->src_len = 0;
    self->dest_len = 0; /* a cleared hop only falls back, and has nowhere to fall back to */
    return 0;
}

static void
hop_dealloc(Hop *self)
{
    PyObject_GC_UnTrack(self);
    hop_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
hop_set_dest(Hop *self, PyObject *addr)
{
    struct sockaddr_storage dest;
    socklen_t len;
    if (parse_addr(addr, &dest, &len) < 0)
        return NULL;
    self->dest = dest;
    self->dest_len = len;
    Py_RETURN_NONE;
}

static PyObject *
hop_set_source(Hop *self, PyObject *addr)
{
    if (set_source(self, addr) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
counters(Hop *self)
{
    return Py_BuildValue("(KKKKKK)", self->packets_in, self->bytes_in, self->packets_out,
                         self->bytes_out, self->dropped, self->send_errors);
}

static PyObject *
hop_take(Hop *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = counters(self);
    if (out != NULL)
        self->packets_in = self->bytes_in = self->packets_out = self->bytes_out = self->dropped =
            self->send_errors = 0;
    return out;
}

static PyObject *
hop_get_counters(Hop *self, void *Py_UNUSED(closure))
{
    return counters(self);
}

static PyObject *
hop_get_rx(Hop *self, void *Py_UNUSED(closure))
{
    return Py_BuildValue("(LLLLLLLL)", self->max_seq, self->base_seq, self->cycles, self->bad_seq,
                         self->received, self->expected_before, self->received_before,
                         self->restarts);
}

static int
hop_set_rx(Hop *self, PyObject *value, void *Py_UNUSED(closure))
{
    long long v[8];
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "rx_state cannot be deleted");
        return -1;
    }
    if (!PyArg_ParseTuple(value, "LLLLLLLL", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                          &v[7]))
        return -1;
    self->max_seq = v[0];
    self->base_seq = v[1];
    self->cycles = v[2];
    self->bad_seq = v[3];
    self->received = v[4];
    self->expected_before = v[5];
    self->received_before = v[6];
    self->restarts = v[7];
    return 0;
}

static PyMethodDef hop_methods[] = {
    {"set_dest", (PyCFunction)hop_set_dest, METH_O, "Send to this address from now on."},
    {"set_source", (PyCFunction)hop_set_source, METH_O,
     "The latched remote address (None: any source calls latch)."},
    {"take", (PyCFunction)hop_take, METH_NOARGS,
     "(packets_in, bytes_in, packets_out, bytes_out, dropped, send_errors), then zero them."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef hop_getset[] = {
    {"counters", (getter)hop_get_counters, NULL, "The counters `take` returns, not zeroed.", NULL},
    {"rx_state", (getter)hop_get_rx, (setter)hop_set_rx,
     "RFC 3550 A.3 state: (max_seq, base_seq, cycles, bad_seq, received, expected_before, "
     "received_before, restarts).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject HopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "freecall.srtp._hop.Hop",
    .tp_doc = PyDoc_STR("One direction of a secure media stream: SRTP and sendto in C."),
    .tp_basicsize = sizeof(Hop),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = hop_new,
    .tp_init = (initproc)hop_init,
    .tp_dealloc = (destructor)hop_dealloc,
    .tp_traverse = (traverseproc)hop_traverse,
    .tp_clear = (inquiry)hop_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Hop, vectorcall),
    .tp_methods = hop_methods,
    .tp_getset = hop_getset,
};

/* -- the Reader: a socket's datagrams read in C ------------------------------------------------ */

/* A `Reader` is what `loop.add_reader(fd, reader)` calls when a media socket is readable. It
 * reads with recvmmsg(2) into buffers of its own, a batch at a time, and stops at a short
 * batch (so the common wake-up, one datagram, is one system call and no failing read; epoll
 * is level-triggered and wakes it again for what is left) or at `limit` datagrams (one busy
 * socket cannot starve the loop). Each datagram goes to the protocol's current
 * `datagram_received`: a Hop runs on the buffer without making any Python object; anything
 * else (and whatever a Hop declines) gets (bytes, (host, port)) exactly as the loop's own
 * transport would give. */

#define READER_MAX_BATCH 32
#define READER_SLOT 4096 /* a ZRTP Confirm with a large signature still fits; RTP is <= 1500 */

typedef struct {
    unsigned char data[READER_MAX_BATCH][READER_SLOT];
    struct sockaddr_storage names[READER_MAX_BATCH];
    struct iovec iov[READER_MAX_BATCH];
    struct mmsghdr msgs[READER_MAX_BATCH];
} ReadBuffers;

/* One set of buffers serves every Reader: the GIL is held and a wake-up is not re-entered on
 * one thread; a Reader called while another is in a Python callback (another thread's loop)
 * takes buffers of its own for that wake-up. */
static ReadBuffers shared_buffers;
static int shared_busy;

/* What stays the same between reads: each slot's buffer and address. */
static void
init_buffers(ReadBuffers *b)
{
    memset(b->msgs, 0, sizeof(b->msgs));
    for (int i = 0; i < READER_MAX_BATCH; i++) {
        b->iov[i].iov_base = b->data[i];
        b->iov[i].iov_len = READER_SLOT;
        b->msgs[i].msg_hdr.msg_name = &b->names[i];
        b->msgs[i].msg_hdr.msg_iov = &b->iov[i];
        b->msgs[i].msg_hdr.msg_iovlen = 1;
    }
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *protocol; /* NULL once closed */
    PyObject *routes;   /* NULL, or {route_key(source): Hop} for a socket shared by sources */
    int fd;
    int batch, limit;
    unsigned long long wakeups, reads, datagrams, truncated;
} Reader;

static PyObject *str_datagram_received, *str_error_received;

static PyObject *
make_addr(const struct sockaddr_storage *sa)
{
    char host[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        if (inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(sin->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        if (inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, (int)ntohs(sin6->sin6_port),
                             (unsigned int)ntohl(sin6->sin6_flowinfo),
                             (unsigned int)sin6->sin6_scope_id);
    }
    Py_RETURN_NONE; /* not a family media sockets use */
}

static int
same_source(const Hop *hop, const struct sockaddr_storage *sa)
{
    if (hop->src_len == 0 || hop->src.ss_family != sa->ss_family)
        return 0;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&hop->src;
        const struct sockaddr_in *b = (const struct sockaddr_in *)sa;
        return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&hop->src;
        const struct sockaddr_in6 *b = (const struct sockaddr_in6 *)sa;
        return a->sin6_port == b->sin6_port && a->sin6_flowinfo == b->sin6_flowinfo
               && a->sin6_scope_id == b->sin6_scope_id
               && memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(a->sin6_addr)) == 0;
    }
    return 0;
}

/* Hand one datagram to Python: fn(bytes, addr), or with data NULL fn(addr) (a latch). */
static PyObject *
reader_to_python(PyObject *fn, const unsigned char *data, Py_ssize_t n,
                 const struct sockaddr_storage *sa, int with_data)
{
    PyObject *addr = make_addr(sa);
    if (addr == NULL)
        return NULL;
    PyObject *r;
    if (with_data) {
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)data, n);
        if (bytes == NULL) {
            Py_DECREF(addr);
            return NULL;
        }
        PyObject *args[2] = {bytes, addr};
        r = PyObject_Vectorcall(fn, args, 2, NULL);
        Py_DECREF(bytes);
    }
    else {
        PyObject *args[1] = {addr};
        r = PyObject_Vectorcall(fn, args, 1, NULL);
    }
    Py_DECREF(addr);
    return r;
}

/* A callback raised: the first exception is raised by the wake-up once its batch is done
 * (the loop reports it as it would the transport's), later ones are reported at once; the
 * datagrams after it are still delivered. */
typedef struct {
    PyObject *type, *value, *traceback;
} SavedError;

static void
keep_error(SavedError *first, PyObject *where)
{
    if (first->type == NULL)
        PyErr_Fetch(&first->type, &first->value, &first->traceback);
    else
        PyErr_WriteUnraisable(where);
}

/* A hop on one datagram of the Reader's; returns 1 when Python ran (a fallback or a latch). */
static int
reader_hop(Hop *hop, const unsigned char *d, Py_ssize_t n, const struct sockaddr_storage *sa,
           SavedError *error, PyObject *where)
{
    PyObject *r;
    int what = hop_run(hop, d, n);
    if (what == HOP_DONE)
        return 0;
    if (what == HOP_CHECK_SOURCE) {
        if (hop->latch == NULL || same_source(hop, sa))
            return 0;
        PyObject *latch = Py_NewRef(hop->latch);
        r = reader_to_python(latch, NULL, 0, sa, 0);
        Py_DECREF(latch);
    }
    else if (hop->fallback == NULL) {
        return 0; /* cleared */
    }
    else {
        PyObject *fallback = Py_NewRef(hop->fallback);
        r = reader_to_python(fallback, d, n, sa, 1);
        Py_DECREF(fallback);
    }
    if (r == NULL)
        keep_error(error, where);
    Py_XDECREF(r);
    return 1;
}

static PyObject *
reader_vectorcall(PyObject *obj, PyObject *const *Py_UNUSED(args), size_t nargsf,
                  PyObject *kwnames)
{
    Reader *self = (Reader *)obj;
    if (PyVectorcall_NARGS(nargsf) != 0 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Reader is called with no arguments");
        return NULL;
    }
    if (self->protocol == NULL || self->fd < 0)
        Py_RETURN_NONE;
    self->wakeups++;
    ReadBuffers *b = &shared_buffers;
    int own = 0;
    if (shared_busy) {
        b = PyMem_Malloc(sizeof(*b));
        if (b == NULL)
            return PyErr_NoMemory();
        init_buffers(b);
        own = 1;
    }
    else {
        shared_busy = 1;
    }
    Py_INCREF(self); /* a callback may drop the last other reference (close) */
    SavedError error = {NULL, NULL, NULL};
    PyObject *handler = NULL; /* the protocol's datagram_received, fetched again after Python */
    int count = 0;
    while (count < self->limit && self->protocol != NULL && self->fd >= 0) {
        int want = self->limit - count < self->batch ? self->limit - count : self->batch;
        for (int i = 0; i < want; i++)
            b->msgs[i].msg_hdr.msg_namelen = sizeof(b->names[i]); /* the kernel shortens it */
        int got;
        do {
            got = recvmmsg(self->fd, b->msgs, (unsigned int)want, MSG_DONTWAIT, NULL);
        } while (got < 0 && errno == EINTR);
        self->reads++;
        if (got < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                /* as the loop's transport: the protocol's error_received (ICMP errors) */
                PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", errno,
                                                      strerror(errno));
                PyObject *r = NULL;
                if (exc != NULL) {
                    PyObject *protocol = Py_NewRef(self->protocol);
                    r = PyObject_CallMethodOneArg(protocol, str_error_received, exc);
                    Py_DECREF(protocol);
                    Py_DECREF(exc);
                }
                if (r == NULL)
                    keep_error(&error, obj);
                Py_XDECREF(r);
            }
            break;
        }
        count += got;
        for (int i = 0; i < got && self->protocol != NULL; i++) {
            self->datagrams++;
            if (b->msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
                self->truncated++; /* longer than any media datagram: dropped */
                continue;
            }
            const unsigned char *d = b->data[i];
            Py_ssize_t n = (Py_ssize_t)b->msgs[i].msg_len;
            const struct sockaddr_storage *sa = &b->names[i];
            if (self->routes != NULL && sa->ss_family == AF_INET) {
                /* a shared socket: the source's own hop, if it has one */
                const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
                PyObject *key = PyLong_FromUnsignedLongLong(
                    (unsigned long long)ntohl(sin->sin_addr.s_addr) << 16 | ntohs(sin->sin_port));
                if (key == NULL) {
                    keep_error(&error, obj);
                    continue;
                }
                PyObject *routed = PyDict_GetItemWithError(self->routes, key);
                Py_DECREF(key);
                if (routed != NULL && Py_TYPE(routed) == &HopType) {
                    Py_INCREF(routed);
                    int ran = reader_hop((Hop *)routed, d, n, sa, &error, obj);
                    Py_DECREF(routed);
                    if (ran)
                        Py_CLEAR(handler);
                    continue;
                }
                if (PyErr_Occurred()) {
                    keep_error(&error, obj);
                    continue;
                }
            }
            if (handler == NULL) {
                PyObject *protocol = Py_NewRef(self->protocol);
                handler = PyObject_GetAttr(protocol, str_datagram_received);
                Py_DECREF(protocol);
                if (handler == NULL) {
                    keep_error(&error, obj);
                    continue;
                }
            }
            int ran;
            if (Py_TYPE(handler) == &HopType) {
                ran = reader_hop((Hop *)handler, d, n, sa, &error, obj);
            }
            else {
                PyObject *r = reader_to_python(handler, d, n, sa, 1);
                if (r == NULL)
                    keep_error(&error, obj);
                Py_XDECREF(r);
                ran = 1;
            }
            if (ran)
                Py_CLEAR(handler); /* Python ran: the handler may have been swapped */
        }
        if (got < want)
            break; /* a short batch: the socket is empty (or nearly: epoll says so again) */
    }
    Py_XDECREF(handler);
    if (own)
        PyMem_Free(b);
    else
        shared_busy = 0;
    Py_DECREF(self);
    if (error.type != NULL) {
        PyErr_Restore(error.type, error.value, error.traceback);
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "protocol", "batch", "limit", "routes", NULL};
    int fd, batch = 16, limit = 64;
    PyObject *protocol, *routes = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO|$iiO", kwlist, &fd, &protocol, &batch,
                                     &limit, &routes))
        return -1;
    if (routes != Py_None && !PyDict_CheckExact(routes)) {
        PyErr_SetString(PyExc_TypeError, "routes must be a dict or None");
        return -1;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return -1;
    }
    if (batch < 1 || batch > READER_MAX_BATCH || limit < 1) {
        PyErr_Format(PyExc_ValueError, "batch must be 1-%d and limit at least 1",
                     READER_MAX_BATCH);
        return -1;
    }
    self->fd = fd;
    self->batch = batch;
    self->limit = limit;
    Py_XSETREF(self->protocol, Py_NewRef(protocol));
    Py_XSETREF(self->routes, routes == Py_None ? NULL : Py_NewRef(routes));
    return 0;
}

static PyObject *
reader_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    Reader *self = (Reader *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->vectorcall = reader_vectorcall;
        self->fd = -1;
    }
    return (PyObject *)self;
}

static int
reader_traverse(Reader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->protocol);
    Py_VISIT(self->routes);
    return 0;
}

static int
reader_clear(Reader *self)
{
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->routes);
    self->fd = -1;
    return 0;
}

static void
reader_dealloc(Reader *self)
{
    PyObject_GC_UnTrack(self);
    reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
reader_close(Reader *self, PyObject *Py_UNUSED(ignored))
{
    reader_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
reader_get_protocol(Reader *self, void *Py_UNUSED(closure))
{
    if (self->protocol == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(self->protocol);
}

static int
reader_set_protocol(Reader *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || value == Py_None) {
        PyErr_SetString(PyExc_TypeError, "a Reader's protocol is set, not removed (close)");
        return -1;
    }
    if (self->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the Reader is closed");
        return -1;
    }
    Py_XSETREF(self->protocol, Py_NewRef(value));
    return 0;
}

static PyObject *
reader_get_stats(Reader *self, void *Py_UNUSED(closure))
{
    return Py_BuildValue("(KKKK)", self->wakeups, self->reads, self->datagrams, self->truncated);
}

static PyObject *
reader_get_closed(Reader *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->fd < 0);
}

static PyObject *
route_key(PyObject *Py_UNUSED(module), PyObject *addr)
{
    struct sockaddr_storage sa;
    socklen_t len;
    if (parse_addr(addr, &sa, &len) < 0)
        return NULL;
    if (sa.ss_family != AF_INET) {
        PyErr_SetString(PyExc_ValueError, "routes are by IPv4 source");
        return NULL;
    }
    const struct sockaddr_in *sin = (const struct sockaddr_in *)&sa;
    return PyLong_FromUnsignedLongLong((unsigned long long)ntohl(sin->sin_addr.s_addr) << 16
                                       | ntohs(sin->sin_port));
}

static PyMethodDef module_methods[] = {
    {"route_key", (PyCFunction)route_key, METH_O,
     "The key of a Reader's routes for an IPv4 (host, port) source."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef reader_methods[] = {
    {"close", (PyCFunction)reader_close, METH_NOARGS,
     "Read no more (a wake-up in progress stops after the current datagram)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef reader_getset[] = {
    {"protocol", (getter)reader_get_protocol, (setter)reader_set_protocol,
     "Whose datagram_received and error_received get the datagrams.", NULL},
    {"stats", (getter)reader_get_stats, NULL,
     "(wake-ups, recvmmsg calls, datagrams, truncated datagrams dropped).", NULL},
    {"closed", (getter)reader_get_closed, NULL, "close() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "freecall.srtp._hop.Reader",
    .tp_doc = PyDoc_STR("A media socket's datagrams read in C, batched, for loop.add_reader."),
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = reader_new,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Reader, vectorcall),
    .tp_methods = reader_methods,
    .tp_getset = reader_getset,
};

static struct PyModuleDef hop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "freecall.srtp._hop",
    .m_doc = PyDoc_STR("The media bridge's secure per-packet hop in C (see _hop.c)."),
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__hop(void)
{
    if (PyType_Ready(&HopType) < 0 || PyType_Ready(&ReaderType) < 0)
        return NULL;
    init_buffers(&shared_buffers);
    str_datagram_received = PyUnicode_InternFromString("datagram_received");
    str_error_received = PyUnicode_InternFromString("error_received");
    if (str_datagram_received == NULL || str_error_received == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&hop_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hop", (PyObject *)&HopType) < 0
        || PyModule_AddObjectRef(m, "Reader", (PyObject *)&ReaderType) < 0
        || PyModule_AddIntConstant(m, "READER_SLOT", READER_SLOT) < 0
        || PyModule_AddIntConstant(m, "MAX_PACKET", HOP_MAX_PACKET) < 0
        || PyModule_AddIntConstant(m, "MAX_TRAILER", HOP_MAX_TRAILER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

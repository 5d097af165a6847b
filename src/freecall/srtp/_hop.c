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
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>

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

static PyObject *
to_fallback(Hop *self, PyObject *data, PyObject *addr)
{
    PyObject *args[2] = {data, addr};
    return PyObject_Vectorcall(self->fallback, args, 2, NULL);
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

static PyObject *
hop_vectorcall(PyObject *obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Hop *self = (Hop *)obj;
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Hop is called with (data, addr)");
        return NULL;
    }
    PyObject *data = args[0], *addr = args[1];
    if (!PyBytes_CheckExact(data) || self->dest_len == 0)
        return to_fallback(self, data, addr);
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    int len = (int)n;
    if (!self->unprotect) {
        /* phone->net: RTP version 2, a whole fixed header, not RTCP muxed on the RTP port
         * (RFC 5761 section 4: second octet 192-223), no longer than pylibsrtp accepts. */
        if (n < RTP_HEADER_LEN || (d[0] >> 6) != 2 || (d[1] > 191 && d[1] < 224)
            || n > HOP_MAX_PACKET - HOP_MAX_TRAILER)
            return to_fallback(self, data, addr);
        memcpy(self->buf, d, (size_t)n);
        if (self->fn(self->ctx, self->buf, &len) != 0) {
            self->dropped++; /* as the Python path: a packet libsrtp refuses is dropped */
            Py_RETURN_NONE;
        }
        self->packets_in++;
        self->bytes_in += (unsigned long long)n;
        send_out(self, len);
        Py_RETURN_NONE;
    }
    /* net->phone: anything that does not authenticate is the Python path's to classify
     * (ZRTP, STUN, SRTCP on the RTP port, forgeries, replays). */
    if (n < RTP_HEADER_LEN || n > HOP_MAX_PACKET)
        return to_fallback(self, data, addr);
    memcpy(self->buf, d, (size_t)n);
    if (self->fn(self->ctx, self->buf, &len) != 0)
        return to_fallback(self, data, addr);
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
    if (self->latch != NULL && self->source != addr) {
        int same = self->source != NULL ? PyObject_RichCompareBool(addr, self->source, Py_EQ) : 0;
        if (same < 0)
            return NULL;
        if (!same) { /* authenticated from a new source: symmetric RTP moves the target */
            PyObject *largs[1] = {addr};
            return PyObject_Vectorcall(self->latch, largs, 1, NULL);
        }
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
    Py_XSETREF(self->source, source == Py_None ? NULL : Py_NewRef(source));
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
    Py_XSETREF(self->source, addr == Py_None ? NULL : Py_NewRef(addr));
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

static struct PyModuleDef hop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "freecall.srtp._hop",
    .m_doc = PyDoc_STR("The media bridge's secure per-packet hop in C (see _hop.c)."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__hop(void)
{
    if (PyType_Ready(&HopType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&hop_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hop", (PyObject *)&HopType) < 0
        || PyModule_AddIntConstant(m, "MAX_PACKET", HOP_MAX_PACKET) < 0
        || PyModule_AddIntConstant(m, "MAX_TRAILER", HOP_MAX_TRAILER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* The Maglev fill of edge_lb/dataplane/maglev.py, in C: the same turns in the same order, plain probing.
 *
 * Why C: the fill is a sequential loop (each turn takes the first free slot its member's preference list
 * reaches, so every turn depends on all the turns before it); numpy cannot vectorise it exactly, and in pure
 * Python its ~0.8 M probes for 65,537 slots cost ~20 ms. Hashing (blake2b) stays in Python: the caller
 * passes each member's start, skip and weight in canonical order.
 *
 *     fill(owners, starts, skips, weights) -> None
 *
 * owners: a writable buffer of C ints (array('i')); its length is the ring size M (prime). Every slot is
 * set to the index of the member that claims it. starts[i] in [0, M), skips[i] in [1, M), weights[i] in
 * [0, 2^63), at least one above 0. In round r member i takes a turn iff
 * floor((r + 1) * w / wmax) > floor(r * w / wmax), tracked as r * w mod wmax so that no product overflows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t size;       /* M */
    uint32_t count;      /* members */
    uint64_t *position;  /* the next slot of each member's preference list */
    uint64_t *skip;
    uint64_t *weight;
} ring_t;

static int is_prime(uint64_t n)
{
    if (n < 2) return 0;
    if (n % 2 == 0) return n == 2;
    for (uint64_t d = 3; d * d <= n; d += 2)
        if (n % d == 0) return 0;
    return 1;
}

/* One turn: member i claims the first free slot of its preference list (one exists: M is prime). */
static void claim(int *owners, ring_t *ring, uint32_t i)
{
    uint64_t slot = ring->position[i], skip = ring->skip[i], size = ring->size;
    while (owners[slot] >= 0) {
        slot += skip;
        if (slot >= size) slot -= size;
    }
    owners[slot] = (int)i;
    slot += skip;
    ring->position[i] = slot >= size ? slot - size : slot;
}

/* Equal weights: every member takes a turn in every round. */
static void fill_equal(int *owners, ring_t *ring)
{
    uint64_t left = ring->size;
    for (;;)
        for (uint32_t i = 0; i < ring->count; i++) {
            claim(owners, ring, i);
            if (--left == 0) return;
        }
}

/* One member's turns: the next one's round, and round * w mod wmax at that round (rest). */
typedef struct {
    uint64_t round, rest;
    uint64_t w, quot, mod;  /* wmax = quot * w + mod */
} turns_t;

/* From a turn in round t->round (where rest + w >= wmax) to the next one. With after = rest + w - wmax in
 * [0, w), the rounds without a turn are (wmax - after - 1) / w = quot - (after >= mod), without a division.
 * No overflow: rest < wmax, w <= wmax < 2^63, and rest + skipped * w <= wmax - 1. */
static inline void next_turn(turns_t *t, uint64_t wmax)
{
    uint64_t after = t->rest + t->w - wmax;
    uint64_t skipped = t->quot - (after >= t->mod);
    t->round += 1 + skipped;
    t->rest = after + skipped * t->w;
}

typedef struct {
    turns_t *member;  /* each member's next turn */
    uint64_t *count;  /* turns per round of the window, then where each round starts */
    uint32_t *order;  /* the window's turns in (round, canonical index) order */
    uint64_t capacity;
} schedule_t;

/* The turns of rounds [base, end), sorted by round with a counting sort; members are visited in canonical
 * order, so within a round they stay in it. Returns how many, or -1 when out of memory. */
static int64_t window(schedule_t *s, const ring_t *ring, uint64_t wmax, uint64_t base, uint64_t end)
{
    uint64_t total = 0;
    memset(s->count, 0, (size_t)(end - base + 1) * sizeof(uint64_t));
    for (uint32_t i = 0; i < ring->count; i++)
        for (turns_t t = s->member[i]; t.w && t.round < end; total++, next_turn(&t, wmax))
            s->count[t.round - base + 1]++;
    if (total > s->capacity) {
        PyMem_RawFree(s->order);
        s->order = PyMem_RawMalloc((size_t)total * sizeof(uint32_t));
        s->capacity = s->order ? total : 0;
        if (!s->order) return -1;
    }
    for (uint64_t r = 1; r <= end - base; r++)  /* count[r] becomes where round base + r - 1 starts */
        s->count[r] += s->count[r - 1];
    for (uint32_t i = 0; i < ring->count; i++)
        for (turns_t *t = &s->member[i]; t->w && t->round < end; next_turn(t, wmax))
            s->order[s->count[t->round - base]++] = i;
    return (int64_t)total;
}

/* Any weights: the turns generated a window of rounds at a time, each window sized to about fill the slots
 * still free (at least one turn a round: the heaviest member takes one in every round). */
static int fill_weighted(int *owners, ring_t *ring, uint64_t wmax)
{
    schedule_t s = {0};
    double per_round = 0;  /* turns per round, on average */
    int ok = -1;
    s.member = PyMem_RawCalloc(ring->count, sizeof(turns_t));
    s.count = PyMem_RawCalloc(ring->size + 2, sizeof(uint64_t));
    if (!s.member || !s.count) goto out;
    for (uint32_t i = 0; i < ring->count; i++) {
        turns_t *t = &s.member[i];
        t->w = ring->weight[i];
        per_round += (double)t->w / (double)wmax;
        if (!t->w) continue;  /* weight 0: no turn, ever */
        t->quot = wmax / t->w;
        t->mod = wmax % t->w;
        t->round = (wmax - 1) / t->w;  /* the first round with floor((r + 1) * w / wmax) >= 1 */
        t->rest = t->round * t->w;     /* < wmax */
    }
    uint64_t left = ring->size, base = 0;
    while (left > 0) {
        uint64_t rounds = (uint64_t)((double)left / per_round) + 1;
        uint64_t end = base + (rounds < left ? rounds : left);
        int64_t turns = window(&s, ring, wmax, base, end);
        if (turns < 0) goto out;
        for (int64_t t = 0; t < turns && left > 0; t++, left--)
            claim(owners, ring, s.order[t]);
        base = end;
    }
    ok = 0;
out:
    PyMem_RawFree(s.member);
    PyMem_RawFree(s.count);
    PyMem_RawFree(s.order);
    return ok;
}

/* seq[i] as an integer in [low, high], or -1 with ValueError naming the argument and the index. */
static int read_column(PyObject *seq, const char *name, uint64_t low, uint64_t high, uint64_t *out)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyLong_Check(item)) {
            PyErr_Format(PyExc_TypeError, "Maglev fill: %s[%zd] must be an int, not %.80s", name, i,
                         Py_TYPE(item)->tp_name);
            return -1;
        }
        int overflow = 0;
        long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (value == -1 && PyErr_Occurred()) return -1;
        if (overflow || value < 0 || (uint64_t)value < low || (uint64_t)value > high) {
            PyErr_Format(PyExc_ValueError, "Maglev fill: %s[%zd] = %R is outside [%llu, %llu]", name, i,
                         item, (unsigned long long)low, (unsigned long long)high);
            return -1;
        }
        out[i] = (uint64_t)value;
    }
    return 0;
}

/* The ring size from the owners buffer: a contiguous, writable buffer of C ints with a prime length. */
static int ring_size(Py_buffer *view, uint64_t *size)
{
    const char *format = view->format ? view->format : "B";
    if (format[0] == '@') format++;
    if (view->itemsize != sizeof(int) || strcmp(format, "i") != 0) {
        PyErr_Format(PyExc_ValueError, "Maglev fill: owners must hold C ints (array('i')), got format '%s'",
                     view->format ? view->format : "B");
        return -1;
    }
    Py_ssize_t length = view->len / view->itemsize;
    if (length > INT_MAX || !is_prime((uint64_t)length)) {
        PyErr_Format(PyExc_ValueError, "Maglev fill: the ring size (len(owners)) must be a prime below 2^31, "
                     "got %zd", length);
        return -1;
    }
    *size = (uint64_t)length;
    return 0;
}

static PyObject *fill_ring(Py_buffer *view, PyObject **columns, Py_ssize_t count)
{
    ring_t ring = {.count = (uint32_t)count};
    PyObject *result = NULL;
    int filled = 0;
    if (ring_size(view, &ring.size) < 0) return NULL;
    ring.position = PyMem_Calloc((size_t)count, sizeof(uint64_t));
    ring.skip = PyMem_Calloc((size_t)count, sizeof(uint64_t));
    ring.weight = PyMem_Calloc((size_t)count, sizeof(uint64_t));
    if (!ring.position || !ring.skip || !ring.weight) {
        PyErr_NoMemory();
        goto out;
    }
    if (read_column(columns[0], "starts", 0, ring.size - 1, ring.position) < 0 ||
        read_column(columns[1], "skips", 1, ring.size - 1, ring.skip) < 0 ||
        read_column(columns[2], "weights", 0, INT64_MAX, ring.weight) < 0)
        goto out;
    uint64_t wmax = 0, wmin = UINT64_MAX;
    for (uint32_t i = 0; i < ring.count; i++) {
        wmax = ring.weight[i] > wmax ? ring.weight[i] : wmax;
        wmin = ring.weight[i] < wmin ? ring.weight[i] : wmin;
    }
    if (wmax == 0) {
        PyErr_SetString(PyExc_ValueError, "Maglev fill: no member has a weight above 0");
        goto out;
    }
    Py_BEGIN_ALLOW_THREADS  /* the buffer stays exported, so the owners array cannot be resized meanwhile */
    memset(view->buf, 0xff, (size_t)view->len);  /* -1: free */
    if (wmin == wmax)
        fill_equal(view->buf, &ring);
    else
        filled = fill_weighted(view->buf, &ring, wmax);
    Py_END_ALLOW_THREADS
    result = filled < 0 ? PyErr_NoMemory() : Py_NewRef(Py_None);
out:
    PyMem_Free(ring.position);
    PyMem_Free(ring.skip);
    PyMem_Free(ring.weight);
    return result;
}

static PyObject *fill(PyObject *module, PyObject *args)
{
    static const char *names[] = {"starts", "skips", "weights"};
    PyObject *owners, *given[3], *columns[3] = {NULL, NULL, NULL};
    Py_buffer view = {0};
    PyObject *result = NULL;
    (void)module;
    if (!PyArg_ParseTuple(args, "OOOO:fill", &owners, &given[0], &given[1], &given[2])) return NULL;
    if (PyObject_GetBuffer(owners, &view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "Maglev fill: owners must be a writable, contiguous array('i'), not %.80s",
                     Py_TYPE(owners)->tp_name);
        return NULL;
    }
    Py_ssize_t count = -1;
    for (int c = 0; c < 3; c++) {
        columns[c] = PySequence_Fast(given[c], "Maglev fill: starts, skips and weights must be sequences");
        if (!columns[c]) goto out;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(columns[c]);
        if (count >= 0 && n != count) {
            PyErr_Format(PyExc_ValueError, "Maglev fill: %s has %zd members, starts has %zd", names[c], n, count);
            goto out;
        }
        count = n;
    }
    if (count < 1 || count > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "Maglev fill: needs 1 to %d members, got %zd", INT_MAX, count);
        goto out;
    }
    result = fill_ring(&view, columns, count);
out:
    for (int c = 0; c < 3; c++) Py_XDECREF(columns[c]);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"fill", fill, METH_VARARGS,
     "fill(owners, starts, skips, weights): the Maglev table into owners (array('i') of the ring size)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edge_lb.dataplane._maglevfill",
    "The Maglev fill of edge_lb.dataplane.maglev in C (see the top of _maglevfill.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__maglevfill(void)
{
    return PyModule_Create(&module);
}

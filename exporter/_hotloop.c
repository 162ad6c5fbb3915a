/* The GIL sampler's hot loop in C (optional: sampler.py has the same loop in Python).
 *
 * Core.run(until, lo, span, max_gap, hold) sleeps to each tick and, with the GIL released,
 * preads the GIL struct of every target due at that tick and does the time-weighted
 * accounting of sampler.py: strata of ticks, one sample per stratum at a tick drawn
 * uniformly in it, the whole stratum credited with what that sample saw; a sampled clock
 * whose gaps between ticks are clipped at max_gap. It returns before sleeping past
 * `until`, or after a tick at which a read failed, with the failures; everything else
 * (adding, removing, re-validation, closing fds) is done by the Python side between calls.
 * A Python callable per target (3.15+: waiters from the threads' own flags) is called with
 * the GIL taken back.
 *
 * Per target, the state is the Python side's 12-tuple:
 * (c, locked, waiters, switch, interval_us, sampled, held, wait, contended, switches,
 *  samples, enabled); state() copies it under a mutex that each tick holds while updating.
 *
 * Per thread (sampling.per_thread): a target added with the offset of last_holder also
 * credits its held time to the holder's thread-state address, in a small table per target
 * (ACC_SLOTS addresses; any more, and a holder of address 0, go to address 0). drain() hands
 * the table over with the state it adds up to, under the same mutex, and empties it; the
 * Python side maps addresses to TIDs. Off, it costs one test of a NULL pointer per credit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ACC_SLOTS 64      /* a power of 2 */

typedef struct {
    uint64_t ptr;        /* thread-state address; 0: an empty slot */
    double seconds;
} held_t;

typedef struct {
    int active;
    uint64_t uid;        /* which add() filled this slot */
    int fd;
    uint64_t addr;
    int size;
    int off_interval, off_locked, off_switch, off_wrefs, off_enabled;  /* off_enabled -1: none */
    int off_holder;                  /* last_holder; -1: held time is not credited per thread */
    uint64_t holder;                 /* the holder at the last sample (while locked) */
    held_t *acc;                     /* per-thread held seconds since the last drain, or NULL */
    double acc_other;                /* ... of holders with address 0 or beyond ACC_SLOTS */
    PyObject *waiting;               /* callable returning an int or None, or NULL */
    int64_t start, length, last_waiter, next;
    double c;
    long locked, waiters;
    uint64_t sw, interval;
    double sampled, held, wait, contended;
    uint64_t switches;
    long samples;
    long enabled;
} target_t;

typedef struct {
    PyObject_HEAD
    target_t *t;
    Py_ssize_t n, cap;
    double *clock;
    int64_t mask;
    int64_t idle;
    int64_t j;           /* last tick (woken at, or slept through) */
    double c;            /* sampled clock at tick j */
    double last;         /* time of tick j */
    double plan;         /* planned time of tick j + 1, the next to wake at */
    uint64_t rng;
    uint64_t uids;
    long ticks, reads;
    double recent[64];   /* times of the last ticks woken at (ring) */
    pthread_mutex_t mu;
} Core;

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double rnd(Core *self) {   /* splitmix64: uniform in [0, 1) */
    uint64_t z = (self->rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

static int core_init(Core *self, PyObject *args, PyObject *Py_UNUSED(kw)) {
    long long idle;
    double clock0, first;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "LddK", &idle, &clock0, &first, &seed))
        return -1;
    if (idle < 1) {
        PyErr_SetString(PyExc_ValueError, "idle_ticks must be >= 1");
        return -1;
    }
    int64_t size = 4;
    while (size < 2 * idle + 2)
        size *= 2;
    self->clock = PyMem_Calloc((size_t)size, sizeof(double));
    if (!self->clock) {
        PyErr_NoMemory();
        return -1;
    }
    self->mask = size - 1;
    self->idle = idle;
    self->j = 0;
    self->c = clock0;
    self->clock[0] = clock0;
    self->last = monotonic();
    self->plan = self->last + first;
    self->rng = seed;
    pthread_mutex_init(&self->mu, NULL);
    return 0;
}

static void core_dealloc(Core *self) {
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Py_CLEAR(self->t[i].waiting);
        PyMem_Free(self->t[i].acc);
    }
    PyMem_Free(self->t);
    PyMem_Free(self->clock);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* add(fd, address, size, (off_interval, off_locked, off_switch, off_wrefs, off_enabled),
 *     waiting or None, state 12-tuple[, off_holder, holder]) -> (index, uid); first sampled at
 *     the next tick. off_holder >= 0: credit held time per holder (drain()); holder: the
 *     holder at the state's last sample. */
static PyObject *core_add(Core *self, PyObject *args) {
    int fd, size, oi, ol, os_, ow, oe, oh = -1;
    unsigned long long addr, holder = 0;
    PyObject *waiting, *st;
    double c, sampled, held, wait, contended;
    long locked, waiters, samples, enabled;
    unsigned long long sw, interval, switches;
    if (!PyArg_ParseTuple(args, "iKi(iiiii)OO|iK", &fd, &addr, &size, &oi, &ol, &os_, &ow, &oe,
                          &waiting, &st, &oh, &holder))
        return NULL;
    if (!PyArg_ParseTuple(st, "dllKKddddKll", &c, &locked, &waiters, &sw, &interval, &sampled,
                          &held, &wait, &contended, &switches, &samples, &enabled))
        return NULL;
    if (size <= 0 || size > 256 || oi < 0 || ol < 0 || os_ < 0 || ow < 0 || oi + 8 > size ||
        ol + 4 > size || os_ + 8 > size || ow + 4 > size || (oe >= 0 && oe + 4 > size) ||
        oh + 8 > size) {
        PyErr_SetString(PyExc_ValueError, "field offsets outside the read");
        return NULL;
    }
    held_t *acc = NULL;
    if (oh >= 0) {
        acc = PyMem_Calloc(ACC_SLOTS, sizeof(held_t));
        if (!acc)
            return PyErr_NoMemory();
    }
    Py_ssize_t i;
    for (i = 0; i < self->n; i++)
        if (self->t[i].uid == 0)
            break;
    if (i == self->n) {
        if (self->n == self->cap) {
            Py_ssize_t cap = self->cap ? self->cap * 2 : 16;
            target_t *t = PyMem_Realloc(self->t, (size_t)cap * sizeof(target_t));
            if (!t) {
                PyMem_Free(acc);
                return PyErr_NoMemory();
            }
            pthread_mutex_lock(&self->mu);
            self->t = t;
            self->cap = cap;
            pthread_mutex_unlock(&self->mu);
        }
        self->n++;
    }
    target_t *t = &self->t[i];
    pthread_mutex_lock(&self->mu);
    memset(t, 0, sizeof(*t));
    t->uid = ++self->uids;
    t->fd = fd;
    t->addr = addr;
    t->size = size;
    t->off_interval = oi;
    t->off_locked = ol;
    t->off_switch = os_;
    t->off_wrefs = ow;
    t->off_enabled = oe;
    t->off_holder = oh;
    t->holder = holder;
    t->acc = acc;
    if (waiting != Py_None) {
        Py_INCREF(waiting);
        t->waiting = waiting;
    }
    t->start = self->j + 1;
    t->length = 1;
    t->next = self->j + 1;
    t->last_waiter = INT64_MIN / 2;
    t->c = c;
    t->locked = locked;
    t->waiters = waiters;
    t->sw = sw;
    t->interval = interval;
    t->sampled = sampled;
    t->held = held;
    t->wait = wait;
    t->contended = contended;
    t->switches = switches;
    t->samples = samples;
    t->enabled = enabled;
    t->active = 1;
    pthread_mutex_unlock(&self->mu);
    return Py_BuildValue("(nK)", i, (unsigned long long)t->uid);
}

static int index_arg(Core *self, PyObject *args, Py_ssize_t *i) {  /* remove(index) */
    if (!PyArg_ParseTuple(args, "n", i))
        return -1;
    if (*i < 0 || *i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "no such target");
        return -1;
    }
    return 0;
}

static PyObject *core_remove(Core *self, PyObject *args) {
    Py_ssize_t i;
    if (index_arg(self, args, &i) < 0)
        return NULL;
    PyObject *waiting = self->t[i].waiting;
    held_t *acc = self->t[i].acc;
    pthread_mutex_lock(&self->mu);
    self->t[i].active = 0;
    self->t[i].uid = 0;
    self->t[i].fd = -1;
    self->t[i].waiting = NULL;
    self->t[i].acc = NULL;
    pthread_mutex_unlock(&self->mu);
    Py_XDECREF(waiting);
    PyMem_Free(acc);
    Py_RETURN_NONE;
}

/* The 12-tuple of a target's state, as sampler.py's _Target.state holds it. */
static PyObject *state_tuple(const target_t *t) {
    return Py_BuildValue("(dllKKddddKll)", t->c, t->locked, t->waiters, (unsigned long long)t->sw,
                         (unsigned long long)t->interval, t->sampled, t->held, t->wait,
                         t->contended, (unsigned long long)t->switches, t->samples, t->enabled);
}

/* state(index, uid) -> the 12-tuple, or None once that slot holds another target */
static PyObject *core_state(Core *self, PyObject *args) {
    Py_ssize_t i;
    unsigned long long uid;
    if (!PyArg_ParseTuple(args, "nK", &i, &uid))
        return NULL;
    if (i < 0 || i >= self->n)
        Py_RETURN_NONE;
    pthread_mutex_lock(&self->mu);
    target_t t = self->t[i];
    pthread_mutex_unlock(&self->mu);
    if (t.uid != uid)
        Py_RETURN_NONE;
    return state_tuple(&t);
}

/* drain(index, uid) -> (state 12-tuple, {holder address: held seconds}, holder), or None once
 * that slot holds another target: the held time credited per holder since the last drain,
 * taken with the state it adds up to, and emptied. */
static PyObject *core_drain(Core *self, PyObject *args) {
    Py_ssize_t i;
    unsigned long long uid;
    if (!PyArg_ParseTuple(args, "nK", &i, &uid))
        return NULL;
    if (i < 0 || i >= self->n)
        Py_RETURN_NONE;
    held_t acc[ACC_SLOTS];
    pthread_mutex_lock(&self->mu);
    target_t t = self->t[i];
    double other = 0.0;
    if (t.uid == uid && t.acc) {
        memcpy(acc, t.acc, sizeof(acc));
        memset(t.acc, 0, sizeof(acc));
        other = t.acc_other;
        self->t[i].acc_other = 0.0;
    }
    pthread_mutex_unlock(&self->mu);
    if (t.uid != uid)
        Py_RETURN_NONE;
    PyObject *held = PyDict_New();
    if (!held)
        return NULL;
    int n = t.acc ? ACC_SLOTS : 0;
    for (int k = -1; k < n; k++) {
        uint64_t ptr = k < 0 ? 0 : acc[k].ptr;
        double s = k < 0 ? other : acc[k].seconds;
        if ((k >= 0 && !ptr) || s == 0.0)
            continue;
        PyObject *key = PyLong_FromUnsignedLongLong(ptr), *val = PyFloat_FromDouble(s);
        if (!key || !val || PyDict_SetItem(held, key, val) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            Py_DECREF(held);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(val);
    }
    PyObject *state = state_tuple(&t);
    if (!state) {
        Py_DECREF(held);
        return NULL;
    }
    return Py_BuildValue("(NNK)", state, held, (unsigned long long)t.holder);
}

static inline uint64_t get_u64(const unsigned char *b, int off) {
    uint64_t v;
    memcpy(&v, b + off, 8);
    return v;
}

static inline int32_t get_i32(const unsigned char *b, int off) {
    int32_t v;
    memcpy(&v, b + off, 4);
    return v;
}

/* Held time of the holder at `ptr` (per-thread targets only; mutex held). */
static void credit(target_t *t, uint64_t ptr, double dt) {
    if (ptr) {
        uint64_t h = ((ptr >> 4) * 0x9E3779B97F4A7C15ULL) >> 58;
        for (uint64_t k = 0; k < ACC_SLOTS; k++) {
            held_t *e = &t->acc[(h + k) & (ACC_SLOTS - 1)];
            if (e->ptr == ptr || !e->ptr) {
                e->ptr = ptr;
                e->seconds += dt;
                return;
            }
        }
    }
    t->acc_other += dt;
}

/* The accounting of one sample (called with the mutex held). */
static void account(Core *self, target_t *t, int64_t j, double c, int64_t hold, long locked,
                    long waiters, uint64_t sw, uint64_t interval, long enabled, uint64_t holder) {
    if (t->samples) {
        /* the previous stratum's state until this stratum starts, then this one's */
        double cs = self->clock[t->start & self->mask];
        double dt = cs - t->c;
        t->sampled += dt;
        if (t->locked) {
            t->held += dt;
            if (t->acc)
                credit(t, t->holder, dt);
            if (t->waiters)
                t->contended += dt;
        }
        if (t->waiters)
            t->wait += dt * (double)t->waiters;
        dt = c - cs;
        if (dt != 0.0) {
            t->sampled += dt;
            if (locked) {
                t->held += dt;
                if (t->acc)
                    credit(t, holder, dt);
                if (waiters)
                    t->contended += dt;
            }
            if (waiters)
                t->wait += dt * (double)waiters;
        }
        if (sw != t->sw)
            t->switches += sw - t->sw;
    }
    t->c = c;
    t->locked = locked;
    t->holder = holder;
    t->waiters = waiters;
    t->sw = sw;
    t->interval = interval;
    t->enabled = enabled;
    t->samples++;
    /* the next stratum, decided from what was seen up to now */
    if (waiters)
        t->last_waiter = j;
    int64_t start = t->start + t->length;
    t->start = start;
    if (j - t->last_waiter < hold || self->idle == 1) {
        t->length = 1;
        t->next = start;
    } else {
        t->length = self->idle;
        t->next = start + (int64_t)(rnd(self) * (double)self->idle);
    }
}

#define MAX_FAILURES 256

/* run(until, lo, span, max_gap, hold) -> [(index, errno, kind)]; kind 0: read error, 1: short
 * read, 2: implausible `locked`. The GIL is released except to call a target's `waiting`;
 * the mutex is held only while a target's state changes (never while taking the GIL). */
static PyObject *core_run(Core *self, PyObject *args) {
    double until, lo, span, max_gap;
    long long hold;
    if (!PyArg_ParseTuple(args, "ddddL", &until, &lo, &span, &max_gap, &hold))
        return NULL;
    Py_ssize_t fidx[MAX_FAILURES];
    int ferr[MAX_FAILURES], fkind[MAX_FAILURES];
    int nfail = 0;
    unsigned char buf[256];
    PyThreadState *save = PyEval_SaveThread();
    while (self->plan <= until && nfail == 0) {
        struct timespec ts;
        double plan = self->plan;
        ts.tv_sec = (time_t)plan;
        ts.tv_nsec = (long)((plan - (double)ts.tv_sec) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;  /* a signal for the main thread: keep sleeping */
        double now = monotonic();
        int64_t j = ++self->j;
        double gap = now - self->last;
        self->c += gap < max_gap ? gap : max_gap;
        self->clock[j & self->mask] = self->c;
        self->last = now;
        self->recent[self->ticks & 63] = now;
        double c = self->c;
        for (Py_ssize_t i = 0; i < self->n; i++) {
            target_t *tp = &self->t[i];
            if (!tp->active || tp->next > j)
                continue;
            ssize_t r = pread(tp->fd, buf, (size_t)tp->size, (off_t)tp->addr);
            int err = r < 0 ? errno : 0;
            long locked = r == tp->size ? get_i32(buf, tp->off_locked) : 0;
            if (r != tp->size || (locked & ~1L)) {
                tp->active = 0;
                if (nfail < MAX_FAILURES) {
                    fidx[nfail] = i;
                    ferr[nfail] = err;
                    fkind[nfail] = r < 0 ? 0 : (r != tp->size ? 1 : 2);
                    nfail++;
                }
                continue;
            }
            uint64_t interval = get_u64(buf, tp->off_interval);
            uint64_t sw = get_u64(buf, tp->off_switch);
            long waiters = (long)((uint32_t)get_i32(buf, tp->off_wrefs) >> 3);
            long enabled = tp->off_enabled >= 0 ? get_i32(buf, tp->off_enabled) : -1;
            uint64_t holder = tp->off_holder >= 0 ? get_u64(buf, tp->off_holder) : 0;
            if (tp->waiting) {
                PyEval_RestoreThread(save);
                PyObject *exact = PyObject_CallNoArgs(tp->waiting);
                if (exact && exact != Py_None) {
                    long v = PyLong_AsLong(exact);
                    if (!(v == -1 && PyErr_Occurred()))
                        waiters = v;
                }
                Py_XDECREF(exact);
                PyErr_Clear();
                save = PyEval_SaveThread();
                tp = &self->t[i];
            }
            pthread_mutex_lock(&self->mu);
            account(self, tp, j, c, hold, locked, waiters, sw, interval, enabled, holder);
            pthread_mutex_unlock(&self->mu);
            self->reads++;
        }
        self->ticks++;
        /* the next tick to wake at: the first with a target due, at most `idle` ahead; the
           ticks before it are slept through and go on the clock at their planned times */
        int64_t k = 1;
        for (; k < self->idle; k++) {
            int due = 0;
            for (Py_ssize_t i = 0; i < self->n && !due; i++)
                due = self->t[i].active && self->t[i].next <= j + k;
            if (due)
                break;
        }
        double t = plan;
        for (int64_t i = 0; i < k; i++) {
            if (i) {
                self->j++;
                self->c += t - self->last;
                self->clock[self->j & self->mask] = self->c;
                self->last = t;
            }
            t += lo + span * rnd(self);
            if (t < now)   /* fell behind (starved): restart the schedule */
                t = now + lo + span * rnd(self);
        }
        self->plan = t;
    }
    PyEval_RestoreThread(save);
    PyObject *failures = PyList_New(nfail);
    if (!failures)
        return NULL;
    for (int i = 0; i < nfail; i++) {
        PyObject *item = Py_BuildValue("(nii)", fidx[i], ferr[i], fkind[i]);
        if (!item) {
            Py_DECREF(failures);
            return NULL;
        }
        PyList_SET_ITEM(failures, i, item);
    }
    return failures;
}

static PyObject *core_get_ticks(Core *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->ticks); }
static PyObject *core_get_reads(Core *self, void *Py_UNUSED(c)) { return PyLong_FromLong(self->reads); }
static PyObject *core_get_clock(Core *self, void *Py_UNUSED(c)) { return PyFloat_FromDouble(self->c); }
static PyObject *core_get_plan(Core *self, void *Py_UNUSED(c)) { return PyFloat_FromDouble(self->plan); }

static PyObject *core_get_recent(Core *self, void *Py_UNUSED(c)) {
    long n = self->ticks < 64 ? self->ticks : 64;
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    for (long i = 0; i < n; i++) {
        PyObject *v = PyFloat_FromDouble(self->recent[(self->ticks - n + i) & 63]);
        if (!v) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *core_reschedule(Core *self, PyObject *args) {
    /* a new rate: the next tick no later than `at` */
    double at;
    if (!PyArg_ParseTuple(args, "d", &at))
        return NULL;
    if (at < self->plan)
        self->plan = at;
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"add", (PyCFunction)core_add, METH_VARARGS, "add a target; returns its index"},
    {"remove", (PyCFunction)core_remove, METH_VARARGS, "stop sampling a target"},
    {"state", (PyCFunction)core_state, METH_VARARGS, "a target's state tuple"},
    {"drain", (PyCFunction)core_drain, METH_VARARGS, "state and per-holder held time since the last drain"},
    {"run", (PyCFunction)core_run, METH_VARARGS, "sample until `until`, or a failure"},
    {"reschedule", (PyCFunction)core_reschedule, METH_VARARGS, "next tick no later than `at`"},
    {NULL}
};

static PyGetSetDef core_getset[] = {
    {"ticks", (getter)core_get_ticks, NULL, "ticks woken at", NULL},
    {"reads", (getter)core_get_reads, NULL, "target-samples taken", NULL},
    {"clock", (getter)core_get_clock, NULL, "the sampled clock", NULL},
    {"plan", (getter)core_get_plan, NULL, "planned time of the next tick", NULL},
    {"recent", (getter)core_get_recent, NULL, "times of the last ticks woken at (up to 64)", NULL},
    {NULL}
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporter._hotloop.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
    .tp_doc = "Core(idle_ticks, clock, first_delay, seed): the sampler's targets and tick loop",
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hotloop", "The GIL sampler's hot loop (see sampler.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__hotloop(void) {
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

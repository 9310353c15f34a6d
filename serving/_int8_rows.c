/* Lookups of ctcvr's compact int8 embedding rows (serving/tables.py, Int8Rows).
 *
 * A row of dim D is D + 2 bytes: D codes, the index of its scale in the file's 256 float32
 * scales, and its zero point; element d is scales[row[D]] * (row[d] - row[D + 1]). torch has
 * no kernel for this layout, and gathering the rows and dequantising them with torch or numpy
 * operations costs several times the gather itself, so the two loops live here. Every
 * argument is a C-contiguous buffer (numpy arrays; torch tensors through .numpy()) whose item
 * type and size are checked (rows uint8, scales and out float32, ids and offsets int64); an id
 * outside the table raises IndexError and nothing is read or written past a buffer.
 *
 *   gather(rows, scales, ids, out, dim)              out[i] = row ids[i]
 *   pool_sum(rows, scales, ids, offsets, out, dim)   out[b] = sum of rows ids[offsets[b]:offsets[b + 1]]
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NUM_SCALES 256

typedef struct {
    const uint8_t *rows;
    Py_ssize_t num_rows;
    Py_ssize_t width; /* dim + 2 */
    const float *scales;
    Py_ssize_t dim;
} Table;

/* out[0:dim] (+)= row `id` dequantised. */
static inline void add_row(const Table *t, int64_t id, float *out, int first)
{
    const uint8_t *row = t->rows + id * t->width;
    const float scale = t->scales[row[t->dim]];
    const float zero_point = (float)row[t->dim + 1];
    if (first) {
        for (Py_ssize_t d = 0; d < t->dim; d++)
            out[d] = scale * ((float)row[d] - zero_point);
    } else {
        for (Py_ssize_t d = 0; d < t->dim; d++)
            out[d] += scale * ((float)row[d] - zero_point);
    }
}

/* The first position of `ids` outside the table, or -1. */
static Py_ssize_t first_bad_id(const int64_t *ids, Py_ssize_t n, Py_ssize_t num_rows)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= num_rows)
            return i;
    return -1;
}

/* A C-contiguous buffer of `obj` with items of `itemsize` bytes whose struct format code (its
 * last character) is one of `codes`: "B" uint8, "f" float32, "lq" int64. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize,
                      const char *codes, const char *name, const char *type)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a %sC-contiguous %s array, got %s", name,
                     writable ? "writable " : "", type, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *format = view->format ? view->format : "B";
    char code = format[strlen(format) - 1];
    if (view->itemsize != itemsize || strchr(codes, code) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s items, got format '%s' of %zd bytes", name,
                     type, format, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int open_table(Table *t, Py_buffer *rows, Py_buffer *scales, Py_ssize_t dim)
{
    if (dim <= 0) {
        PyErr_Format(PyExc_ValueError, "dim must be positive, got %zd", dim);
        return -1;
    }
    if (rows->len % (dim + 2) != 0) {
        PyErr_Format(PyExc_ValueError, "rows: %zd bytes is not a whole number of %zd-byte rows",
                     rows->len, dim + 2);
        return -1;
    }
    if (scales->len != NUM_SCALES * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "scales: expected %d float32 (%zd bytes), got %zd bytes",
                     NUM_SCALES, NUM_SCALES * (Py_ssize_t)sizeof(float), scales->len);
        return -1;
    }
    t->rows = (const uint8_t *)rows->buf;
    t->width = dim + 2;
    t->num_rows = rows->len / t->width;
    t->scales = (const float *)scales->buf;
    t->dim = dim;
    return 0;
}

static int check_ids(const Table *t, Py_buffer *ids, Py_ssize_t *n)
{
    *n = ids->len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t bad = first_bad_id((const int64_t *)ids->buf, *n, t->num_rows);
    if (bad >= 0) {
        PyErr_Format(PyExc_IndexError, "id %lld at position %zd is outside the table's %zd rows",
                     (long long)((const int64_t *)ids->buf)[bad], bad, t->num_rows);
        return -1;
    }
    return 0;
}

static int check_out(Py_buffer *out, Py_ssize_t count, Py_ssize_t dim)
{
    if (out->len != count * dim * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "out: expected %zd x %zd float32 (%zd bytes), got %zd bytes",
                     count, dim, count * dim * (Py_ssize_t)sizeof(float), out->len);
        return -1;
    }
    return 0;
}

/* The buffers of rows, scales, ids and out (in that order in `views`); on failure none held. */
static int get_buffers(PyObject *const *objects, Py_buffer *views, int count)
{
    static const struct {
        int writable;
        Py_ssize_t itemsize;
        const char *codes, *name, *type;
    } spec[] = {
        {0, 1, "B", "rows", "uint8"},     {0, 4, "f", "scales", "float32"},
        {0, 8, "lq", "ids", "int64"},     {0, 8, "lq", "offsets", "int64"},
        {1, 4, "f", "out", "float32"},
    };
    /* gather has no offsets: its four buffers are specs 0, 1, 2, 4 */
    static const int gather_specs[] = {0, 1, 2, 4}, pool_specs[] = {0, 1, 2, 3, 4};
    const int *which = count == 4 ? gather_specs : pool_specs;
    for (int i = 0; i < count; i++) {
        int k = which[i];
        if (get_buffer(objects[i], &views[i], spec[k].writable, spec[k].itemsize, spec[k].codes,
                       spec[k].name, spec[k].type) != 0) {
            while (i-- > 0)
                PyBuffer_Release(&views[i]);
            return -1;
        }
    }
    return 0;
}

static void release_buffers(Py_buffer *views, int count)
{
    for (int i = 0; i < count; i++)
        PyBuffer_Release(&views[i]);
}

static PyObject *gather(PyObject *self, PyObject *args)
{
    PyObject *objects[4];
    Py_buffer views[4];
    Py_ssize_t dim, n;
    Table t;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOn", &objects[0], &objects[1], &objects[2], &objects[3], &dim)
        || get_buffers(objects, views, 4) != 0)
        return NULL;
    if (open_table(&t, &views[0], &views[1], dim) == 0 && check_ids(&t, &views[2], &n) == 0
        && check_out(&views[3], n, dim) == 0) {
        const int64_t *id = (const int64_t *)views[2].buf;
        float *dst = (float *)views[3].buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            add_row(&t, id[i], dst + i * dim, 1);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    release_buffers(views, 4);
    return result;
}

/* Bag b spans ids[offsets[b]:offsets[b + 1]], the last bag up to the end; offsets must start
 * at 0 and never decrease. An empty bag gives zeros. */
static int check_offsets(const int64_t *offsets, Py_ssize_t bags, Py_ssize_t n)
{
    for (Py_ssize_t b = 0; b < bags; b++) {
        int64_t stop = b + 1 < bags ? offsets[b + 1] : n;
        int64_t start = offsets[b];
        if ((b == 0 && start != 0) || start > stop || stop > n) {
            PyErr_Format(PyExc_ValueError,
                         "offsets: bag %zd spans %lld:%lld of %zd ids (offsets must start at 0 "
                         "and never decrease)", b, (long long)start, (long long)stop, n);
            return -1;
        }
    }
    return 0;
}

static PyObject *pool_sum(PyObject *self, PyObject *args)
{
    PyObject *objects[5];
    Py_buffer views[5];
    Py_ssize_t dim, n, bags;
    Table t;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOn", &objects[0], &objects[1], &objects[2], &objects[3],
                          &objects[4], &dim)
        || get_buffers(objects, views, 5) != 0)
        return NULL;
    bags = views[3].len / (Py_ssize_t)sizeof(int64_t);
    if (open_table(&t, &views[0], &views[1], dim) == 0 && check_ids(&t, &views[2], &n) == 0
        && check_offsets((const int64_t *)views[3].buf, bags, n) == 0
        && check_out(&views[4], bags, dim) == 0) {
        const int64_t *id = (const int64_t *)views[2].buf;
        const int64_t *start = (const int64_t *)views[3].buf;
        float *dst = (float *)views[4].buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t b = 0; b < bags; b++) {
            int64_t stop = b + 1 < bags ? start[b + 1] : n;
            float *bag = dst + b * dim;
            if (start[b] == stop)
                memset(bag, 0, (size_t)dim * sizeof(float));
            for (int64_t i = start[b]; i < stop; i++)
                add_row(&t, id[i], bag, i == start[b]);
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    release_buffers(views, 5);
    return result;
}

static PyMethodDef methods[] = {
    {"gather", gather, METH_VARARGS,
     "gather(rows, scales, ids, out, dim): out[i] = row ids[i], dequantised"},
    {"pool_sum", pool_sum, METH_VARARGS,
     "pool_sum(rows, scales, ids, offsets, out, dim): out[b] = the sum of bag b's rows"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "serving._int8_rows",
    "Lookups of compact int8 embedding rows (D codes, a scale index, a zero point).", -1, methods,
};

PyMODINIT_FUNC PyInit__int8_rows(void)
{
    return PyModule_Create(&module);
}

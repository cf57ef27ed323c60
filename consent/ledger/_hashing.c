/* RFC 9162 section 2.1.1 hashing in bulk: the compiled core of consent/ledger/hashing.py.
 *
 * Verifying a ledger export costs two SHA-256 per entry (its leaf and, on average, one
 * interior node). Through hashlib each of them is a Python call that allocates, copies and
 * frees an OpenSSL context, about half a microsecond whatever the length; here one OpenSSL
 * EVP context is reused for a whole list, and interior nodes never become Python objects.
 * The hashing itself is OpenSSL's SHA-256 (the same code hashlib calls), through the EVP
 * interface; this file only loops. Nothing here parses the export: the inputs are bytes
 * objects that the Python side has already cut out of it.
 *
 *   leaf_hashes(entries: list[bytes]) -> list[bytes]
 *       [SHA-256(0x00 || e) for e in entries]
 *   perfect_root(hashes: Sequence[bytes]) -> bytes
 *       MTH of a perfect subtree: len(hashes) a power of two, each level hashed pairwise
 *       as SHA-256(0x01 || left || right); one hash is its own root.
 *
 * Both give up the GIL while they hash a large batch: the inputs are held by a tuple the
 * call owns and bytes objects cannot change, and the outputs are not visible to anyone yet.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>

#define HASH_SIZE 32
/* below this many inputs, taking and giving back the GIL costs more than it frees */
#define RELEASE_GIL_FROM 64

static const EVP_MD *sha256_md;

/* SHA-256(prefix || a || b) into out (b may be NULL); 0 on an OpenSSL failure. */
static int
hash_into(EVP_MD_CTX *ctx, unsigned char prefix, const char *a, Py_ssize_t a_len,
          const char *b, Py_ssize_t b_len, unsigned char *out)
{
    if (!EVP_DigestInit_ex(ctx, sha256_md, NULL)
        || !EVP_DigestUpdate(ctx, &prefix, 1)
        || !EVP_DigestUpdate(ctx, a, (size_t)a_len)
        || (b != NULL && !EVP_DigestUpdate(ctx, b, (size_t)b_len))) {
        return 0;
    }
    return EVP_DigestFinal_ex(ctx, out, NULL);
}

/* A tuple of the sequence's items, each checked to be bytes; NULL with an error set. */
static PyObject *
bytes_tuple(PyObject *seq, const char *what)
{
    PyObject *items = PySequence_Tuple(seq);
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s %zd is %.100s, not bytes", what, i,
                         Py_TYPE(item)->tp_name);
            Py_DECREF(items);
            return NULL;
        }
    }
    return items;
}

static PyObject *
openssl_failed(void)
{
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL's SHA-256 failed");
    return NULL;
}

static PyObject *
leaf_hashes(PyObject *module, PyObject *seq)
{
    PyObject *items = bytes_tuple(seq, "entry");
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    int ok = 1, release = n >= RELEASE_GIL_FROM;
    PyThreadState *state = NULL;
    PyObject *out = PyList_New(n);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (out == NULL || ctx == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *digest = PyBytes_FromStringAndSize(NULL, HASH_SIZE);
        if (digest == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(out, i, digest);
    }
    if (release) {
        state = PyEval_SaveThread();
    }
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        PyObject *entry = PyTuple_GET_ITEM(items, i);
        ok = hash_into(ctx, 0x00, PyBytes_AS_STRING(entry), PyBytes_GET_SIZE(entry), NULL, 0,
                       (unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(out, i)));
    }
    if (release) {
        PyEval_RestoreThread(state);
    }
    if (!ok) {
        openssl_failed();
        goto fail;
    }
    EVP_MD_CTX_free(ctx);
    Py_DECREF(items);
    return out;
fail:
    EVP_MD_CTX_free(ctx);
    Py_XDECREF(out);
    Py_DECREF(items);
    return NULL;
}

static PyObject *
perfect_root(PyObject *module, PyObject *seq)
{
    PyObject *items = bytes_tuple(seq, "hash");
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    if (n == 0 || (n & (n - 1)) != 0) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_ValueError,
                        "a perfect subtree has a power-of-two number of leaves");
        return NULL;
    }
    if (n == 1) {  /* a single leaf hash is its own root, whatever its length */
        PyObject *root = PyTuple_GET_ITEM(items, 0);
        Py_INCREF(root);
        Py_DECREF(items);
        return root;
    }
    /* the first level pairs the given hashes (any length, as concatenation would); the next
     * ones pair 32-byte nodes in place, in one buffer */
    unsigned char *level = PyMem_Malloc((size_t)(n / 2) * HASH_SIZE);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (level == NULL || ctx == NULL) {
        PyMem_Free(level);
        EVP_MD_CTX_free(ctx);
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    int ok = 1;
    int release = n >= RELEASE_GIL_FROM;
    PyThreadState *state = release ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; ok && i < n / 2; i++) {
        PyObject *left = PyTuple_GET_ITEM(items, 2 * i);
        PyObject *right = PyTuple_GET_ITEM(items, 2 * i + 1);
        ok = hash_into(ctx, 0x01, PyBytes_AS_STRING(left), PyBytes_GET_SIZE(left),
                       PyBytes_AS_STRING(right), PyBytes_GET_SIZE(right),
                       level + i * HASH_SIZE);
    }
    for (Py_ssize_t width = n / 2; ok && width > 1; width /= 2) {
        for (Py_ssize_t i = 0; ok && i < width / 2; i++) {
            /* node i of the next level overwrites node 2i of this one, already read */
            unsigned char pair[2 * HASH_SIZE];
            memcpy(pair, level + 2 * i * HASH_SIZE, 2 * HASH_SIZE);
            ok = hash_into(ctx, 0x01, (const char *)pair, 2 * HASH_SIZE, NULL, 0,
                           level + i * HASH_SIZE);
        }
    }
    if (release) {
        PyEval_RestoreThread(state);
    }
    PyObject *root = ok ? PyBytes_FromStringAndSize((const char *)level, HASH_SIZE)
                        : openssl_failed();
    PyMem_Free(level);
    EVP_MD_CTX_free(ctx);
    Py_DECREF(items);
    return root;
}

static PyMethodDef methods[] = {
    {"leaf_hashes", leaf_hashes, METH_O,
     "leaf_hashes(entries) -> list of SHA-256(0x00 || entry), RFC 9162 2.1.1"},
    {"perfect_root", perfect_root, METH_O,
     "perfect_root(hashes) -> the root of a perfect subtree over them, RFC 9162 2.1.1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hashing",
    "RFC 9162 leaf and node hashing in bulk (OpenSSL SHA-256); see hashing.py", -1, methods,
};

PyMODINIT_FUNC
PyInit__hashing(void)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    sha256_md = EVP_sha256();
#endif
    if (sha256_md == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL offers no SHA-256");
        return NULL;
    }
    return PyModule_Create(&module);
}

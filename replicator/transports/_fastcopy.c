/* The system calls of small files' copies, many files per call, without the GIL.
 *
 * An optional accelerator of _local_batch.BatchWriter (stage, commit, lstat_at) and of the
 * SSH sender's reads (_ssh_files._load: read_small): the same calls in the same order as
 * their Python paths, which stay the reference and the fallback where this module was not
 * built. Copying a 4 KiB file is a dozen system calls; made from Python each costs a
 * microsecond or two of interpreter work on top of the kernel's, as much again as the copy.
 * Here the interpreter is entered once per file to build the result tuple.
 *
 * Every function takes a list of tuples and returns a list of tuples, one per item, with a
 * code and an errno; the caller turns them into results and error messages. Nothing here
 * raises for a file's failure.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK (8 << 20)

/* stage() codes */
enum { STAGED = 0, VANISHED = 1, CHANGED = 2, SOURCE_ERROR = 3, WRITE_ERROR = 4 };
/* commit() codes */
enum { RENAMED = 0, GONE = 1, MOVED = 2, RENAME_ERROR = 3 };

static long long
mtime_ns(const struct stat *st)
{
    return (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

/* Copy until EOF or until `expected` bytes, as _copy_data does: copy_file_range, or read and
 * write where the kernel cannot (another filesystem, an old kernel). 0 or an errno. */
static int
copy_data(int src, int dst, long long expected)
{
    long long total = 0;
    int use_range = 1;
    static __thread char buffer[1 << 16];
    while (expected <= 0 || total < expected) {
        ssize_t n;
        if (use_range) {
            n = copy_file_range(src, NULL, dst, NULL, CHUNK, 0);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL) {
                    use_range = 0;
                    continue;
                }
                return errno;
            }
        } else {
            n = read(src, buffer, sizeof buffer);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return errno;
            }
            for (ssize_t done = 0; done < n;) {
                ssize_t w = write(dst, buffer + done, (size_t)(n - done));
                if (w < 0) {
                    if (errno == EINTR)
                        continue;
                    return errno;
                }
                done += w;
            }
        }
        if (n == 0)
            return 0;
        total += n;
    }
    return 0;
}

typedef struct {
    int dir_fd;
    const char *source;
    const char *tmp;
    long long size;
    long long mtime_ns;
} stage_item;

typedef struct {
    int code;
    int error;
    struct stat before;
} stage_result;

/* One file, as BatchWriter._stage does for a regular file once its folder is open. */
static void
stage_one(const stage_item *it, int fsync_each, stage_result *out)
{
    memset(out, 0, sizeof *out);
    int src = open(it->source, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (src < 0) {
        out->error = errno;
        out->code = errno == ENOENT ? VANISHED : errno == ELOOP ? CHANGED : SOURCE_ERROR;
        return;
    }
    if (fstat(src, &out->before) != 0) {
        out->error = errno;
        out->code = SOURCE_ERROR;
        close(src);
        return;
    }
    if (out->before.st_size != it->size || mtime_ns(&out->before) != it->mtime_ns) {
        out->code = CHANGED;
        close(src);
        return;
    }
    int dst = openat(it->dir_fd, it->tmp,
                     O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (dst < 0) {
        out->error = errno;
        out->code = WRITE_ERROR;
        close(src);
        return;
    }
    int error = copy_data(src, dst, out->before.st_size);
    /* Never set-user-ID or set-group-ID (_paths.copy_mode). */
    if (!error && fchmod(dst, out->before.st_mode & 01777) != 0)
        error = errno;
    if (!error) {
        struct timespec times[2] = {out->before.st_atim, out->before.st_mtim};
        if (futimens(dst, times) != 0)
            error = errno;
    }
    if (!error && fsync_each && fsync(dst) != 0)
        error = errno;
    if (close(dst) != 0 && !error)
        error = errno;
    close(src);
    if (error) {
        unlinkat(it->dir_fd, it->tmp, 0);
        out->error = error;
        out->code = WRITE_ERROR;
        return;
    }
    out->code = STAGED;
}

/* stage(items, fsync_each) -> [(code, errno, st_ino, st_dev, st_size, st_mtime_ns), ...]
 * items: [(dir_fd, source, tmp, size, mtime_ns), ...]; tmp is created in dir_fd. */
static PyObject *
fastcopy_stage(PyObject *self, PyObject *args)
{
    PyObject *list, *items;
    int fsync_each;
    if (!PyArg_ParseTuple(args, "O!p", &PyList_Type, &list, &fsync_each))
        return NULL;
    /* A tuple of the items: the strings parsed below must outlive the call, even if another
     * thread changed the caller's list while the GIL is released. */
    if ((items = PyList_AsTuple(list)) == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    stage_item *in = PyMem_Calloc((size_t)(n ? n : 1), sizeof *in);
    stage_result *out = PyMem_Calloc((size_t)(n ? n : 1), sizeof *out);
    PyObject *result = NULL;
    if (in == NULL || out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (!PyArg_ParseTuple(item, "iyyLL;stage item", &in[i].dir_fd, &in[i].source,
                              &in[i].tmp, &in[i].size, &in[i].mtime_ns))
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        stage_one(&in[i], fsync_each, &out[i]);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        const struct stat *st = &out[i].before;
        PyObject *row = Py_BuildValue("(iiKKLL)", out[i].code, out[i].error,
                                      (unsigned long long)st->st_ino,
                                      (unsigned long long)st->st_dev,
                                      (long long)st->st_size, mtime_ns(st));
        if (row == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, row);
    }
done:
    Py_DECREF(items);
    PyMem_Free(in);
    PyMem_Free(out);
    return result;
}

typedef struct {
    const char *source;
    int dir_fd;
    const char *tmp;
    const char *name;
    unsigned long long ino, dev;
    long long size, mtime_ns;
} commit_item;

/* One file, as BatchWriter._commit does: rename only if the source is the one read. */
static int
commit_one(const commit_item *it, int *error)
{
    struct stat now;
    *error = 0;
    if (lstat(it->source, &now) != 0) {
        *error = errno;
        return errno == ENOENT ? GONE : MOVED;
    }
    if ((unsigned long long)now.st_ino != it->ino || (unsigned long long)now.st_dev != it->dev
        || now.st_size != it->size || mtime_ns(&now) != it->mtime_ns)
        return MOVED;
    if (renameat(it->dir_fd, it->tmp, it->dir_fd, it->name) != 0) {
        *error = errno;
        return RENAME_ERROR;
    }
    return RENAMED;
}

/* commit(items) -> [(code, errno), ...]
 * items: [(source, dir_fd, tmp, name, st_ino, st_dev, size, mtime_ns), ...] */
static PyObject *
fastcopy_commit(PyObject *self, PyObject *args)
{
    PyObject *list, *items;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list))
        return NULL;
    if ((items = PyList_AsTuple(list)) == NULL)  /* see fastcopy_stage */
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    commit_item *in = PyMem_Calloc((size_t)(n ? n : 1), sizeof *in);
    int *codes = PyMem_Calloc((size_t)(n ? n : 1), sizeof *codes);
    int *errors = PyMem_Calloc((size_t)(n ? n : 1), sizeof *errors);
    PyObject *result = NULL;
    if (in == NULL || codes == NULL || errors == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (!PyArg_ParseTuple(item, "yiyyKKLL;commit item", &in[i].source, &in[i].dir_fd,
                              &in[i].tmp, &in[i].name, &in[i].ino, &in[i].dev, &in[i].size,
                              &in[i].mtime_ns))
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        codes[i] = commit_one(&in[i], &errors[i]);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = Py_BuildValue("(ii)", codes[i], errors[i]);
        if (row == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, row);
    }
done:
    Py_DECREF(items);
    PyMem_Free(in);
    PyMem_Free(codes);
    PyMem_Free(errors);
    return result;
}

/* lstat_at(items) -> [(errno, st_size, st_mtime_ns), ...]; items: [(dir_fd, name), ...] */
static PyObject *
fastcopy_lstat_at(PyObject *self, PyObject *args)
{
    PyObject *list, *items;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list))
        return NULL;
    if ((items = PyList_AsTuple(list)) == NULL)  /* see fastcopy_stage */
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    int *fds = PyMem_Calloc((size_t)(n ? n : 1), sizeof *fds);
    const char **names = PyMem_Calloc((size_t)(n ? n : 1), sizeof *names);
    struct stat *st = PyMem_Calloc((size_t)(n ? n : 1), sizeof *st);
    int *errors = PyMem_Calloc((size_t)(n ? n : 1), sizeof *errors);
    PyObject *result = NULL;
    if (fds == NULL || names == NULL || st == NULL || errors == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(items, i), "iy;lstat item", &fds[i], &names[i]))
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        errors[i] = fstatat(fds[i], names[i], &st[i], AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = Py_BuildValue("(iLL)", errors[i], (long long)st[i].st_size,
                                      mtime_ns(&st[i]));
        if (row == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, row);
    }
done:
    Py_DECREF(items);
    PyMem_Free(fds);
    PyMem_Free(names);
    PyMem_Free(st);
    PyMem_Free(errors);
    return result;
}

/* read_small() codes */
enum { READ = 0, READ_VANISHED = 1, READ_CHANGED = 2, READ_ERROR = 3 };

static int
same_version(const struct stat *a, const struct stat *b)
{
    return a->st_ino == b->st_ino && a->st_dev == b->st_dev && a->st_size == b->st_size
           && mtime_ns(a) == mtime_ns(b);
}

typedef struct {
    const char *source;
    long long size, mtime_ns;
    int code, error;
    char *data;
    size_t length;
    struct stat before;
} read_item;

/* One small file, as _ssh_files._load and _check_unchanged do: read whole, then checked
 * unchanged by descriptor and by path. */
static void
read_one(read_item *it)
{
    int fd = open(it->source, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        it->error = errno;
        it->code = errno == ENOENT ? READ_VANISHED
                   : (errno == ELOOP || errno == EINVAL) ? READ_CHANGED : READ_ERROR;
        return;
    }
    struct stat after, current;
    if (fstat(fd, &it->before) != 0) {
        it->error = errno;
        it->code = READ_ERROR;
        goto done;
    }
    if (it->before.st_size != it->size || mtime_ns(&it->before) != it->mtime_ns) {
        it->code = READ_CHANGED;
        goto done;
    }
    /* Until EOF: a file that grew is read whole, and then found changed. */
    size_t capacity = (size_t)it->before.st_size + 1;
    it->data = malloc(capacity);
    if (it->data == NULL) {
        it->error = ENOMEM;
        it->code = READ_ERROR;
        goto done;
    }
    for (;;) {
        if (it->length == capacity) {
            char *grown = realloc(it->data, capacity * 2);
            if (grown == NULL) {
                it->error = ENOMEM;
                it->code = READ_ERROR;
                goto done;
            }
            it->data = grown;
            capacity *= 2;
        }
        ssize_t n = read(fd, it->data + it->length, capacity - it->length);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            it->error = errno;
            it->code = READ_ERROR;
            goto done;
        }
        if (n == 0)
            break;
        it->length += (size_t)n;
    }
    if (fstat(fd, &after) != 0) {
        it->error = errno;
        it->code = READ_ERROR;
        goto done;
    }
    if (lstat(it->source, &current) != 0) {
        it->error = errno;
        it->code = errno == ENOENT ? READ_VANISHED : READ_ERROR;
        goto done;
    }
    it->code = same_version(&it->before, &after) && same_version(&it->before, &current)
               ? READ : READ_CHANGED;
done:
    close(fd);
}

/* read_small(items) -> [(code, errno, data or None, st_ino, st_dev, st_size, st_mode,
 *                        st_atime_ns, st_mtime_ns), ...]; items: [(source, size, mtime_ns)] */
static PyObject *
fastcopy_read_small(PyObject *self, PyObject *args)
{
    PyObject *list, *items;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list))
        return NULL;
    if ((items = PyList_AsTuple(list)) == NULL)  /* see fastcopy_stage */
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    read_item *in = PyMem_Calloc((size_t)(n ? n : 1), sizeof *in);
    PyObject *result = NULL;
    if (in == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(items, i), "yLL;read item", &in[i].source,
                              &in[i].size, &in[i].mtime_ns))
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        read_one(&in[i]);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        const struct stat *st = &in[i].before;
        PyObject *data;
        if (in[i].code == READ)
            data = PyBytes_FromStringAndSize(in[i].data, (Py_ssize_t)in[i].length);
        else
            data = Py_NewRef(Py_None);
        if (data == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        long long atime = (long long)st->st_atim.tv_sec * 1000000000LL + st->st_atim.tv_nsec;
        PyObject *row = Py_BuildValue("(iiNKKLiLL)", in[i].code, in[i].error, data,
                                      (unsigned long long)st->st_ino,
                                      (unsigned long long)st->st_dev, (long long)st->st_size,
                                      (int)st->st_mode, atime, mtime_ns(st));
        if (row == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, row);
    }
done:
    Py_DECREF(items);
    if (in != NULL)
        for (Py_ssize_t i = 0; i < n; i++)
            free(in[i].data);
    PyMem_Free(in);
    return result;
}

static PyMethodDef methods[] = {
    {"stage", fastcopy_stage, METH_VARARGS,
     "stage(items, fsync_each): write each source to its temp name; one row per item."},
    {"commit", fastcopy_commit, METH_VARARGS,
     "commit(items): rename each temp file into place if its source is unchanged."},
    {"read_small", fastcopy_read_small, METH_VARARGS,
     "read_small(items): each small source read whole and checked unchanged."},
    {"lstat_at", fastcopy_lstat_at, METH_VARARGS,
     "lstat_at(items): size and mtime of each (dir_fd, name), or the errno."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcopy",
    "The system calls of a local batch's small files, many files per call (optional).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastcopy(void)
{
    return PyModule_Create(&module);
}

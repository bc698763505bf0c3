/* The system calls of small files' copies, many files per call, without the GIL.
 *
 * An optional accelerator of _local_batch.BatchWriter (stage, commit, lstat_at), of the
 * SSH sender's reads (_ssh_files: read_small, read_frames) and of a scan's listings
 * (_walk.list_folder: lstat_names): the same calls in the same order as their Python
 * paths, which stay the reference and the fallback where this module was not built.
 * Copying a 4 KiB file is a dozen system calls; made from Python each costs a
 * microsecond or two of interpreter work on top of the kernel's, as much again as the copy.
 * Here the interpreter is entered once per file to build the result tuple.
 *
 * Every function takes a list of tuples (lstat_names: a folder and its names) and returns a
 * list of tuples, one per item, with a code and an errno (read_frames: and the frames);
 * the caller turns them into results and error messages. Nothing here raises for a file's
 * failure.
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

/* Set when copy_file_range could not copy between the files of a stage() call (sources and
 * replica on different filesystems: the usual case of a backup disk, or an old kernel). The
 * call's other files, which almost always go between the same two filesystems, are then
 * read and written without trying it first: one failed system call per call, not per file.
 * Per thread: stage() runs in several threads at once. */
static __thread int range_failed;

/* Copy until EOF or until `expected` bytes, as _copy_data does: copy_file_range, or read and
 * write where the kernel cannot (another filesystem, an old kernel). 0 or an errno. */
static int
copy_data(int src, int dst, long long expected)
{
    long long total = 0;
    int use_range = !range_failed;
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
                    range_failed = 1;
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

/* -- the driver: a list of items in, a list of rows out --------------------------------- */

typedef struct {
    size_t size;                                /* of one item */
    int (*parse)(PyObject *item, void *slot);   /* false, with an exception, on bad input */
    void (*work)(void *item, int flag);         /* runs without the GIL; flag: per call */
    PyObject *(*build)(void *item);             /* the item's row */
    void (*clear)(void *item);                  /* frees what work allocated, or NULL */
} kind;

/* A call's items: parsed into slots (``batch_open``), worked on without the GIL
 * (``batch_work``), turned into rows (``batch_rows``); ``batch_close`` frees them. */
typedef struct {
    PyObject *items;
    char *slots;
    Py_ssize_t n;
} batch;

static int
batch_open(batch *b, PyObject *list, const kind *k)
{
    /* A tuple of the items: the strings parsed from them must outlive the call, even if
     * another thread changed the caller's list while the GIL is released. Every item is
     * parsed before any work starts, so bad input raises with nothing done. */
    b->slots = NULL;
    b->n = 0;
    if ((b->items = PyList_AsTuple(list)) == NULL)
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(b->items);
    if ((b->slots = PyMem_Calloc((size_t)(n ? n : 1), k->size)) == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!k->parse(PyTuple_GET_ITEM(b->items, i), b->slots + (size_t)i * k->size))
            return 0;
        b->n = i + 1;  /* parsed: cleared by batch_close */
    }
    return 1;
}

static void
batch_work(batch *b, const kind *k, int flag)
{
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < b->n; i++)
        k->work(b->slots + (size_t)i * k->size, flag);
    Py_END_ALLOW_THREADS
}

static PyObject *
batch_rows(batch *b, const kind *k)
{
    PyObject *result = PyList_New(b->n);
    if (result == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < b->n; i++) {
        PyObject *row = k->build(b->slots + (size_t)i * k->size);
        if (row == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, i, row);
    }
    return result;
}

static void
batch_close(batch *b, const kind *k)
{
    if (b->slots != NULL && k->clear != NULL)
        for (Py_ssize_t i = 0; i < b->n; i++)
            k->clear(b->slots + (size_t)i * k->size);
    PyMem_Free(b->slots);
    Py_XDECREF(b->items);
}

static PyObject *
for_each(PyObject *list, const kind *k, int flag)
{
    batch b;
    PyObject *result = NULL;
    if (batch_open(&b, list, k)) {
        batch_work(&b, k, flag);
        result = batch_rows(&b, k);
    }
    batch_close(&b, k);
    return result;
}

/* for_each over the one argument of a call that takes just its list of items. */
static PyObject *
for_each_of(PyObject *args, const kind *k)
{
    PyObject *list;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list))
        return NULL;
    return for_each(list, k, 0);
}

/* -- stage: a source to a temp file next to its destination ---------------------------- */

/* The process's umask for this thread's stage() call, -1 where unknown. */
static __thread int stage_umask;

/* The umask, read from /proc/self/status (Linux 4.7+): umask(2) cannot read it without
 * setting it, which would race other threads creating files. -1 where it is not there. */
static int
current_umask(void)
{
    char buffer[4096];
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buffer, sizeof buffer - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buffer[n] = '\0';
    const char *line = strstr(buffer, "\nUmask:");
    if (line == NULL)
        return -1;
    char *end;
    long value = strtol(line + 8, &end, 8);
    return end == line + 8 || value < 0 || value > 0777 ? -1 : (int)value;
}

typedef struct {
    int dir_fd;
    const char *source, *tmp;
    long long size, mtime_ns;
    int code, error;
    struct stat before;
} stage_item;

static int
stage_parse(PyObject *tuple, void *slot)
{
    stage_item *it = slot;
    return PyArg_ParseTuple(tuple, "iyyLL;stage item", &it->dir_fd, &it->source, &it->tmp,
                            &it->size, &it->mtime_ns);
}

/* One file, as BatchWriter._stage does for a regular file once its folder is open. */
static void
stage_work(void *slot, int fsync_each)
{
    stage_item *it = slot;
    int src = open(it->source, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (src < 0) {
        it->error = errno;
        it->code = errno == ENOENT ? VANISHED : errno == ELOOP ? CHANGED : SOURCE_ERROR;
        return;
    }
    if (fstat(src, &it->before) != 0) {
        it->error = errno;
        it->code = SOURCE_ERROR;
        close(src);
        return;
    }
    if (it->before.st_size != it->size || mtime_ns(&it->before) != it->mtime_ns) {
        it->code = CHANGED;
        close(src);
        return;
    }
    /* Never set-user-ID or set-group-ID (_paths.copy_mode). Created with that mode where
     * the umask leaves it whole, as rsync creates its temp files: no fchmod per file. The
     * temp file is then no more open to others than its copy will be. */
    mode_t mode = it->before.st_mode & 01777;
    int exact = stage_umask >= 0 && (mode & ~(mode_t)stage_umask) == mode;
    int dst = openat(it->dir_fd, it->tmp,
                     O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, exact ? mode : 0600);
    if (dst < 0) {
        it->error = errno;
        it->code = WRITE_ERROR;
        close(src);
        return;
    }
    int error = copy_data(src, dst, it->before.st_size);
    if (!error && !exact && fchmod(dst, mode) != 0)
        error = errno;
    if (!error) {
        struct timespec times[2] = {it->before.st_atim, it->before.st_mtim};
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
        it->error = error;
        it->code = WRITE_ERROR;
        return;
    }
    it->code = STAGED;
}

static PyObject *
stage_build(void *slot)
{
    const stage_item *it = slot;
    return Py_BuildValue("(iiKKLL)", it->code, it->error, (unsigned long long)it->before.st_ino,
                         (unsigned long long)it->before.st_dev, (long long)it->before.st_size,
                         mtime_ns(&it->before));
}

static const kind STAGE = {sizeof(stage_item), stage_parse, stage_work, stage_build, NULL};

/* stage(items, fsync_each) -> [(code, errno, st_ino, st_dev, st_size, st_mtime_ns), ...]
 * items: [(dir_fd, source, tmp, size, mtime_ns), ...]; tmp is created in dir_fd. */
static PyObject *
fastcopy_stage(PyObject *self, PyObject *args)
{
    PyObject *list;
    int fsync_each;
    if (!PyArg_ParseTuple(args, "O!p", &PyList_Type, &list, &fsync_each))
        return NULL;
    range_failed = 0;
    stage_umask = current_umask();
    return for_each(list, &STAGE, fsync_each);
}

/* -- commit: rename a temp file into place if its source is the one read --------------- */

typedef struct {
    const char *source;
    int dir_fd;
    const char *tmp, *name;
    unsigned long long ino, dev;
    long long size, mtime_ns;
    int code, error;
} commit_item;

static int
commit_parse(PyObject *tuple, void *slot)
{
    commit_item *it = slot;
    return PyArg_ParseTuple(tuple, "yiyyKKLL;commit item", &it->source, &it->dir_fd, &it->tmp,
                            &it->name, &it->ino, &it->dev, &it->size, &it->mtime_ns);
}

/* One file, as BatchWriter._commit does. */
static void
commit_work(void *slot, int unused)
{
    commit_item *it = slot;
    struct stat now;
    if (lstat(it->source, &now) != 0) {
        it->error = errno;
        it->code = errno == ENOENT ? GONE : MOVED;
        return;
    }
    if ((unsigned long long)now.st_ino != it->ino || (unsigned long long)now.st_dev != it->dev
        || now.st_size != it->size || mtime_ns(&now) != it->mtime_ns) {
        it->code = MOVED;
        return;
    }
    if (renameat(it->dir_fd, it->tmp, it->dir_fd, it->name) != 0) {
        it->error = errno;
        it->code = RENAME_ERROR;
        return;
    }
    it->code = RENAMED;
}

static PyObject *
commit_build(void *slot)
{
    const commit_item *it = slot;
    return Py_BuildValue("(ii)", it->code, it->error);
}

static const kind COMMIT = {sizeof(commit_item), commit_parse, commit_work, commit_build, NULL};

/* commit(items) -> [(code, errno), ...]
 * items: [(source, dir_fd, tmp, name, st_ino, st_dev, size, mtime_ns), ...] */
static PyObject *
fastcopy_commit(PyObject *self, PyObject *args)
{
    return for_each_of(args, &COMMIT);
}

/* -- lstat_at: what a final file holds ------------------------------------------------- */

typedef struct {
    int dir_fd;
    const char *name;
    int error;
    struct stat st;
} lstat_item;

static int
lstat_parse(PyObject *tuple, void *slot)
{
    lstat_item *it = slot;
    return PyArg_ParseTuple(tuple, "iy;lstat item", &it->dir_fd, &it->name);
}

static void
lstat_work(void *slot, int unused)
{
    lstat_item *it = slot;
    it->error = fstatat(it->dir_fd, it->name, &it->st, AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
}

static PyObject *
lstat_build(void *slot)
{
    const lstat_item *it = slot;
    return Py_BuildValue("(iLL)", it->error, (long long)it->st.st_size, mtime_ns(&it->st));
}

static const kind LSTAT = {sizeof(lstat_item), lstat_parse, lstat_work, lstat_build, NULL};

/* lstat_at(items) -> [(errno, st_size, st_mtime_ns), ...]; items: [(dir_fd, name), ...] */
static PyObject *
fastcopy_lstat_at(PyObject *self, PyObject *args)
{
    return for_each_of(args, &LSTAT);
}

/* -- lstat_names: a folder's entries, for a scan's listing ----------------------------- */

typedef struct {
    const char *name;
    int error;
    struct stat st;
} name_item;

static int
name_parse(PyObject *name, void *slot)
{
    name_item *it = slot;
    if (!PyBytes_Check(name)
        || (Py_ssize_t)strlen(PyBytes_AS_STRING(name)) != PyBytes_GET_SIZE(name)) {
        PyErr_SetString(PyExc_TypeError, "lstat_names: names must be bytes without NUL");
        return 0;
    }
    it->name = PyBytes_AS_STRING(name);
    return 1;
}

static void
name_work(void *slot, int dir_fd)
{
    name_item *it = slot;
    it->error = fstatat(dir_fd, it->name, &it->st, AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
}

static PyObject *
name_build(void *slot)
{
    const name_item *it = slot;
    if (it->error)
        return Py_BuildValue("(iiLL)", it->error, 0, 0LL, 0LL);
    return Py_BuildValue("(iiLL)", 0, (int)it->st.st_mode, (long long)it->st.st_size,
                         mtime_ns(&it->st));
}

static const kind NAMES = {sizeof(name_item), name_parse, name_work, name_build, NULL};

/* lstat_names(dir_fd, names) -> [(errno, st_mode, st_size, st_mtime_ns), ...]: each name
 * of the folder open as dir_fd, not following symlinks, as _walk.list_folder's os.lstat
 * loop makes them; one hand-off of the GIL for the folder instead of one per entry. The
 * items are the names themselves, and the driver's flag is the folder. */
static PyObject *
fastcopy_lstat_names(PyObject *self, PyObject *args)
{
    int dir_fd;
    PyObject *list;
    if (!PyArg_ParseTuple(args, "iO!", &dir_fd, &PyList_Type, &list))
        return NULL;
    return for_each(list, &NAMES, dir_fd);
}

/* -- read_small: a small source read whole for the SSH stream -------------------------- */

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

static int
read_parse(PyObject *tuple, void *slot)
{
    read_item *it = slot;
    return PyArg_ParseTuple(tuple, "yLL;read item", &it->source, &it->size, &it->mtime_ns);
}

/* One small file, as _ssh_files._load and _check_unchanged do: read whole, then checked
 * unchanged by descriptor and by path. */
static void
read_work(void *slot, int unused)
{
    read_item *it = slot;
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

static PyObject *
read_build(void *slot)
{
    const read_item *it = slot;
    const struct stat *st = &it->before;
    PyObject *data = it->code == READ
        ? PyBytes_FromStringAndSize(it->data, (Py_ssize_t)it->length) : Py_NewRef(Py_None);
    if (data == NULL)
        return NULL;
    long long atime = (long long)st->st_atim.tv_sec * 1000000000LL + st->st_atim.tv_nsec;
    return Py_BuildValue("(iiNKKLiLL)", it->code, it->error, data,
                         (unsigned long long)st->st_ino, (unsigned long long)st->st_dev,
                         (long long)st->st_size, (int)st->st_mode, atime, mtime_ns(st));
}

static void
read_clear(void *slot)
{
    read_item *it = slot;
    free(it->data);
    it->data = NULL;
}

static const kind READ_SMALL = {sizeof(read_item), read_parse, read_work, read_build,
                                read_clear};

/* read_small(items) -> [(code, errno, data or None, st_ino, st_dev, st_size, st_mode,
 *                        st_atime_ns, st_mtime_ns), ...]; items: [(source, size, mtime_ns)] */
static PyObject *
fastcopy_read_small(PyObject *self, PyObject *args)
{
    return for_each_of(args, &READ_SMALL);
}

/* -- read_frames: small sources read whole, framed for the receiver -------------------- */

/* The receiver's W frame (_ssh_stream.whole_header): "!cIIqHHI", then dest, tmp and data. */
#define WHOLE_SIZE 25

typedef struct {
    read_item read;  /* first: read_work and read_clear take a frame_item as a read_item */
    Py_ssize_t seq, dlen, tlen;
    const char *dest, *tmp;
} frame_item;

static int
frame_parse(PyObject *tuple, void *slot)
{
    frame_item *it = slot;
    if (!PyArg_ParseTuple(tuple, "yLLny#y#;frame item", &it->read.source, &it->read.size,
                          &it->read.mtime_ns, &it->seq, &it->dest, &it->dlen, &it->tmp,
                          &it->tlen))
        return 0;
    if (it->seq < 0 || (unsigned long long)it->seq > 0xFFFFFFFFULL || it->dlen > 0xFFFF
        || it->tlen > 0xFFFF) {
        PyErr_SetString(PyExc_OverflowError, "frame item: seq, dest or tmp out of range");
        return 0;
    }
    return 1;
}

static PyObject *
frame_build(void *slot)
{
    const read_item *it = slot;
    const struct stat *st = &it->before;
    long long atime = (long long)st->st_atim.tv_sec * 1000000000LL + st->st_atim.tv_nsec;
    return Py_BuildValue("(iiKKLiLL)", it->code, it->error, (unsigned long long)st->st_ino,
                         (unsigned long long)st->st_dev, (long long)st->st_size,
                         (int)st->st_mode, atime, mtime_ns(st));
}

static const kind FRAMES = {sizeof(frame_item), frame_parse, read_work, frame_build,
                            read_clear};

static char *
put_be(char *out, unsigned long long value, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--)
        *out++ = (char)((value >> (8 * i)) & 0xFF);
    return out;
}

/* One file's W frame at ``out``; the end of it. */
static char *
put_whole(char *out, const frame_item *it)
{
    const read_item *r = &it->read;
    *out++ = 'W';
    out = put_be(out, (unsigned long long)it->seq, 4);
    out = put_be(out, (unsigned long long)(r->before.st_mode & 01777), 4);  /* copy_mode */
    out = put_be(out, (unsigned long long)mtime_ns(&r->before), 8);
    out = put_be(out, (unsigned long long)it->dlen, 2);
    out = put_be(out, (unsigned long long)it->tlen, 2);
    out = put_be(out, (unsigned long long)r->length, 4);
    memcpy(out, it->dest, (size_t)it->dlen);
    out += it->dlen;
    memcpy(out, it->tmp, (size_t)it->tlen);
    out += it->tlen;
    memcpy(out, r->data, r->length);
    return out + r->length;
}

/* read_frames(items) -> (frames, [(code, errno, st_ino, st_dev, st_size, st_mode,
 *                                  st_atime_ns, st_mtime_ns), ...])
 * items: [(source, size, mtime_ns, seq, dest, tmp), ...]. Each source as read_small reads
 * it; the frames hold a W frame (_ssh_stream.whole_header, then the content) for each one
 * read (code 0), in order. Built without the GIL: no bytes object per file, no join. */
static PyObject *
fastcopy_read_frames(PyObject *self, PyObject *args)
{
    PyObject *list, *rows = NULL, *frames = NULL, *result = NULL;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list))
        return NULL;
    batch b;
    if (!batch_open(&b, list, &FRAMES))
        goto done;
    batch_work(&b, &FRAMES, 0);
    size_t total = 0;
    for (Py_ssize_t i = 0; i < b.n; i++) {
        frame_item *it = (frame_item *)(b.slots + (size_t)i * sizeof(frame_item));
        if (it->read.code != READ)
            continue;
        if (it->read.length > 0xFFFFFFFFULL) {  /* no W frame holds it (never a small file) */
            it->read.code = READ_ERROR;
            it->read.error = EFBIG;
            continue;
        }
        total += WHOLE_SIZE + (size_t)it->dlen + (size_t)it->tlen + it->read.length;
    }
    if ((rows = batch_rows(&b, &FRAMES)) == NULL)
        goto done;
    if ((frames = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total)) == NULL)
        goto done;
    char *out = PyBytes_AS_STRING(frames);  /* not shared yet: filled without the GIL */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < b.n; i++) {
        const frame_item *it = (const frame_item *)(b.slots + (size_t)i * sizeof(frame_item));
        if (it->read.code == READ)
            out = put_whole(out, it);
    }
    Py_END_ALLOW_THREADS
    result = PyTuple_Pack(2, frames, rows);
done:
    Py_XDECREF(frames);
    Py_XDECREF(rows);
    batch_close(&b, &FRAMES);
    return result;
}

static PyMethodDef methods[] = {
    {"stage", fastcopy_stage, METH_VARARGS,
     "stage(items, fsync_each): write each source to its temp name; one row per item."},
    {"commit", fastcopy_commit, METH_VARARGS,
     "commit(items): rename each temp file into place if its source is unchanged."},
    {"read_small", fastcopy_read_small, METH_VARARGS,
     "read_small(items): each small source read whole and checked unchanged."},
    {"read_frames", fastcopy_read_frames, METH_VARARGS,
     "read_frames(items): small sources read whole, framed for the receiver."},
    {"lstat_at", fastcopy_lstat_at, METH_VARARGS,
     "lstat_at(items): size and mtime of each (dir_fd, name), or the errno."},
    {"lstat_names", fastcopy_lstat_names, METH_VARARGS,
     "lstat_names(dir_fd, names): mode, size and mtime of each name, or the errno."},
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

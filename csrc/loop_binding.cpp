// Python binding of the native copy loop (copy_loop.h) and crc32: marshalling only. A loop
// is a capsule owning one CopyLoop; every call that can block releases the GIL.
#include "loop_binding.h"

#include <vector>

#include "copy_loop.h"
#include "crc32.h"

namespace warmstart::binding {
namespace {

constexpr const char* kLoopCapsule = "warmstart.CopyLoop";

void* as_ptr(unsigned long long addr) { return reinterpret_cast<void*>(addr); }

void drop_loop(PyObject* capsule) {
  auto* loop = static_cast<CopyLoop*>(PyCapsule_GetPointer(capsule, kLoopCapsule));
  if (loop == nullptr) return;
  Py_BEGIN_ALLOW_THREADS delete loop;  // closes it: joins threads that never take the GIL
  Py_END_ALLOW_THREADS
}

CopyLoop* loop_of(PyObject* capsule) {
  return static_cast<CopyLoop*>(PyCapsule_GetPointer(capsule, kLoopCapsule));
}

// A sequence of ints -> vector<T>; false with a Python error set otherwise.
template <typename T>
bool ints(PyObject* obj, std::vector<T>* out) {
  PyObject* seq = PySequence_Fast(obj, "expected a sequence of int");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  out->reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if (PyErr_Occurred()) {
      Py_DECREF(seq);
      return false;
    }
    out->push_back(static_cast<T>(v));
  }
  Py_DECREF(seq);
  return true;
}

}  // namespace

PyObject* py_loop_new(PyObject*, PyObject* args) {
  int device;
  unsigned long long stream, ring;
  unsigned int slots, readers;
  unsigned long long slot_bytes;
  PyObject *file_list, *chunk_list;
  if (!PyArg_ParseTuple(args, "iKKIKIOO", &device, &stream, &ring, &slots, &slot_bytes,
                        &readers, &file_list, &chunk_list))
    return nullptr;
  std::vector<LoopFile> files;
  PyObject* seq = PySequence_Fast(file_list, "files: a list of (fd, direct_fd, size, block, sums)");
  if (seq == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    LoopFile f;
    PyObject* sums;
    unsigned long long size, block;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiKKO", &f.fd, &f.direct_fd, &size,
                          &block, &sums) ||
        !ints(sums, &f.sums)) {
      Py_DECREF(seq);
      return nullptr;
    }
    f.size = size;
    f.block = block;
    files.push_back(std::move(f));
  }
  Py_DECREF(seq);
  std::vector<uint32_t> tensor_chunks;
  if (!ints(chunk_list, &tensor_chunks)) return nullptr;
  auto* loop = new CopyLoop(device, stream, static_cast<char*>(as_ptr(ring)), slots, slot_bytes,
                            readers, std::move(files), std::move(tensor_chunks));
  int err;
  Py_BEGIN_ALLOW_THREADS err = loop->start();
  Py_END_ALLOW_THREADS if (err != 0) {
    Py_BEGIN_ALLOW_THREADS delete loop;
    Py_END_ALLOW_THREADS return Py_BuildValue("(iO)", err, Py_None);
  }
  PyObject* capsule = PyCapsule_New(loop, kLoopCapsule, drop_loop);
  if (capsule == nullptr) {
    delete loop;
    return nullptr;
  }
  PyObject* out = Py_BuildValue("(iO)", 0, capsule);
  Py_DECREF(capsule);
  return out;
}

PyObject* py_loop_submit(PyObject*, PyObject* args) {
  PyObject *capsule, *job_list;
  if (!PyArg_ParseTuple(args, "OO", &capsule, &job_list)) return nullptr;
  CopyLoop* loop = loop_of(capsule);
  if (loop == nullptr) return nullptr;
  PyObject* seq = PySequence_Fast(job_list, "jobs: a list of tuples");
  if (seq == nullptr) return nullptr;
  std::vector<LoopJob> jobs(static_cast<size_t>(PySequence_Fast_GET_SIZE(seq)));
  for (size_t i = 0; i < jobs.size(); ++i) {
    LoopJob& j = jobs[i];
    unsigned long long id, offset, length, skip, copy_len, dst;
    unsigned int file;
    PyObject* tensors;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, static_cast<Py_ssize_t>(i)), "KIKKKKKO",
                          &id, &file, &offset, &length, &skip, &copy_len, &dst, &tensors) ||
        !ints(tensors, &j.tensors)) {
      Py_DECREF(seq);
      return nullptr;
    }
    j.id = id, j.file = file, j.offset = offset, j.length = length, j.skip = skip;
    j.copy_len = copy_len, j.dst = dst;
  }
  Py_DECREF(seq);
  Py_BEGIN_ALLOW_THREADS loop->submit(std::move(jobs));
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_loop_wait(PyObject*, PyObject* args) {
  PyObject* capsule;
  double timeout;
  if (!PyArg_ParseTuple(args, "Od", &capsule, &timeout)) return nullptr;
  CopyLoop* loop = loop_of(capsule);
  if (loop == nullptr) return nullptr;
  LoopBatch batch;
  Py_BEGIN_ALLOW_THREADS batch = loop->wait(timeout);
  Py_END_ALLOW_THREADS PyObject* tensors = PyList_New(static_cast<Py_ssize_t>(batch.tensors.size()));
  PyObject* failures = PyList_New(static_cast<Py_ssize_t>(batch.failures.size()));
  if (tensors == nullptr || failures == nullptr) {
    Py_XDECREF(tensors);
    Py_XDECREF(failures);
    return nullptr;
  }
  for (size_t i = 0; i < batch.tensors.size(); ++i)
    PyList_SET_ITEM(tensors, static_cast<Py_ssize_t>(i), PyLong_FromUnsignedLong(batch.tensors[i]));
  for (size_t i = 0; i < batch.failures.size(); ++i) {
    const LoopFailure& f = batch.failures[i];
    PyList_SET_ITEM(failures, static_cast<Py_ssize_t>(i),
                    Py_BuildValue("(KiLKK)", static_cast<unsigned long long>(f.job), f.status,
                                  static_cast<long long>(f.code),
                                  static_cast<unsigned long long>(f.a),
                                  static_cast<unsigned long long>(f.b)));
  }
  return Py_BuildValue("(NKNO)", tensors, static_cast<unsigned long long>(batch.bytes), failures,
                       batch.cancelled ? Py_True : Py_False);
}

PyObject* py_loop_cancel(PyObject*, PyObject* args) {
  PyObject* capsule;
  if (!PyArg_ParseTuple(args, "O", &capsule)) return nullptr;
  CopyLoop* loop = loop_of(capsule);
  if (loop == nullptr) return nullptr;
  Py_BEGIN_ALLOW_THREADS loop->cancel();
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_loop_close(PyObject*, PyObject* args) {
  PyObject* capsule;
  if (!PyArg_ParseTuple(args, "O", &capsule)) return nullptr;
  CopyLoop* loop = loop_of(capsule);
  if (loop == nullptr) return nullptr;
  Py_BEGIN_ALLOW_THREADS loop->close();
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_loop_stats(PyObject*, PyObject* args) {
  PyObject* capsule;
  if (!PyArg_ParseTuple(args, "O", &capsule)) return nullptr;
  CopyLoop* loop = loop_of(capsule);
  if (loop == nullptr) return nullptr;
  LoopStats s = loop->stats();
  return Py_BuildValue(
      "{sKsKsKsKsKsKsKsIsIsIsI}", "chunks_read", (unsigned long long)s.chunks_read, "copies",
      (unsigned long long)s.copies, "chunks_done", (unsigned long long)s.chunks_done, "wakeups",
      (unsigned long long)s.wakeups, "bytes", (unsigned long long)s.bytes, "direct_reads",
      (unsigned long long)s.direct_reads, "blocks_checked", (unsigned long long)s.blocks_checked,
      "slots", s.slots, "slots_in_use", s.slots_in_use, "max_slots_in_use", s.max_slots_in_use,
      "readers", s.readers);
}

PyObject* py_crc32(PyObject*, PyObject* args) {
  Py_buffer buf;
  unsigned int start = 0;
  if (!PyArg_ParseTuple(args, "y*|I", &buf, &start)) return nullptr;
  uint32_t c;
  Py_BEGIN_ALLOW_THREADS c = crc32(buf.buf, static_cast<size_t>(buf.len), start);
  Py_END_ALLOW_THREADS PyBuffer_Release(&buf);
  return PyLong_FromUnsignedLong(c);
}

}  // namespace warmstart::binding

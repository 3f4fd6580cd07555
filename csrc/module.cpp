// Python binding of the native core: marshalling only. Policy (what to read, retries,
// errors) lives in Python; every call that can block releases the GIL.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>
#include <string>
#include <vector>

#include "chunker.h"
#include "loop_binding.h"
#include "cuda_rt.h"
#include "hostio.h"

namespace {

using namespace warmstart;

void* as_ptr(unsigned long long addr) { return reinterpret_cast<void*>(addr); }

PyObject* py_pread_into(PyObject*, PyObject* args) {
  int fd;
  unsigned long long offset, addr, length;
  if (!PyArg_ParseTuple(args, "iKKK", &fd, &offset, &addr, &length)) return nullptr;
  int64_t n;
  Py_BEGIN_ALLOW_THREADS n = pread_full(fd, offset, as_ptr(addr), length);
  Py_END_ALLOW_THREADS return PyLong_FromLongLong(n);
}

PyObject* py_cached_fraction(PyObject*, PyObject* args) {
  int fd;
  unsigned long long size, max_pages;
  if (!PyArg_ParseTuple(args, "iKK", &fd, &size, &max_pages)) return nullptr;
  double f;
  Py_BEGIN_ALLOW_THREADS f = cached_fraction(fd, size, max_pages);
  Py_END_ALLOW_THREADS return PyFloat_FromDouble(f);
}

PyObject* py_memcpy(PyObject*, PyObject* args) {
  unsigned long long dst, src, n;
  if (!PyArg_ParseTuple(args, "KKK", &dst, &src, &n)) return nullptr;
  Py_BEGIN_ALLOW_THREADS std::memcpy(as_ptr(dst), as_ptr(src), n);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_touch_pages(PyObject*, PyObject* args) {
  unsigned long long addr, length, page;
  if (!PyArg_ParseTuple(args, "KKK", &addr, &length, &page)) return nullptr;
  uint64_t sum;
  Py_BEGIN_ALLOW_THREADS sum = touch_pages(as_ptr(addr), length, page);
  Py_END_ALLOW_THREADS return PyLong_FromUnsignedLongLong(sum);
}

PyObject* py_host_alloc(PyObject*, PyObject* args) {
  unsigned long long nbytes;
  int pinned, device = 0;
  if (!PyArg_ParseTuple(args, "Kp|i", &nbytes, &pinned, &device)) return nullptr;
  void* ptr;
  int kind = 0, err = 0;
  Py_BEGIN_ALLOW_THREADS ptr = host_alloc(nbytes, pinned != 0, device, &kind, &err);
  Py_END_ALLOW_THREADS return Py_BuildValue("(Kii)", reinterpret_cast<unsigned long long>(ptr),
                                            ptr == nullptr ? 0 : kind, err);
}

// A list of str -> vector<string>; false with a Python error set otherwise.
bool strings(PyObject* list, std::vector<std::string>* out) {
  PyObject* seq = PySequence_Fast(list, "expected a list of str");
  if (seq == nullptr) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const char* s = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
    if (s == nullptr) {
      Py_DECREF(seq);
      return false;
    }
    out->emplace_back(s);
  }
  Py_DECREF(seq);
  return true;
}

PyObject* py_host_free(PyObject*, PyObject* args) {
  unsigned long long addr, nbytes;
  int kind, device = 0;
  if (!PyArg_ParseTuple(args, "KKi|i", &addr, &nbytes, &kind, &device)) return nullptr;
  Py_BEGIN_ALLOW_THREADS host_free(as_ptr(addr), nbytes, kind, device);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* py_cuda_load(PyObject*, PyObject* args) {
  PyObject *mapped_list, *path_list;
  if (!PyArg_ParseTuple(args, "OO", &mapped_list, &path_list)) return nullptr;
  std::vector<std::string> mapped, paths;
  if (!strings(mapped_list, &mapped) || !strings(path_list, &paths)) return nullptr;
  int count;
  Py_BEGIN_ALLOW_THREADS count = cuda::load(mapped, paths);
  Py_END_ALLOW_THREADS return PyLong_FromLong(count);
}

PyObject* py_cuda_runtime_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(cuda::loaded_path().c_str());
}

PyObject* py_cuda_get_device(PyObject*, PyObject*) {
  int device = -1, err;
  Py_BEGIN_ALLOW_THREADS err = cuda::get_device(&device);
  Py_END_ALLOW_THREADS return Py_BuildValue("(ii)", err, device);
}

PyObject* py_cuda_copy(PyObject*, PyObject* args) {
  int device;
  unsigned long long dst, src, n, stream, event;
  if (!PyArg_ParseTuple(args, "iKKKKK", &device, &dst, &src, &n, &stream, &event))
    return nullptr;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::copy_and_wait(device, as_ptr(dst), as_ptr(src), n, stream,
                                                   event);
  Py_END_ALLOW_THREADS return PyLong_FromLong(err);
}

PyObject* py_cuda_stream_wait(PyObject*, PyObject* args) {
  int device;
  unsigned long long stream, other, event;
  if (!PyArg_ParseTuple(args, "iKKK", &device, &stream, &other, &event)) return nullptr;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::stream_wait_stream(device, stream, other, event);
  Py_END_ALLOW_THREADS return PyLong_FromLong(err);
}

PyObject* py_cuda_why(PyObject*, PyObject*) { return PyUnicode_FromString(cuda::why().c_str()); }

PyObject* py_cuda_error_string(PyObject*, PyObject* args) {
  int code;
  if (!PyArg_ParseTuple(args, "i", &code)) return nullptr;
  return PyUnicode_FromString(cuda::error_string(code));
}

PyObject* py_cuda_host_register(PyObject*, PyObject* args) {
  unsigned long long addr, nbytes;
  if (!PyArg_ParseTuple(args, "KK", &addr, &nbytes)) return nullptr;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::host_register(as_ptr(addr), nbytes);
  Py_END_ALLOW_THREADS return PyLong_FromLong(err);
}

PyObject* py_cuda_host_unregister(PyObject*, PyObject* args) {
  unsigned long long addr;
  if (!PyArg_ParseTuple(args, "K", &addr)) return nullptr;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::host_unregister(as_ptr(addr));
  Py_END_ALLOW_THREADS return PyLong_FromLong(err);
}

PyObject* py_cuda_stream_create(PyObject*, PyObject* args) {
  int device;
  if (!PyArg_ParseTuple(args, "i", &device)) return nullptr;
  uintptr_t s = 0;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::stream_create(device, &s);  // may create a context
  Py_END_ALLOW_THREADS return Py_BuildValue("(iK)", err, static_cast<unsigned long long>(s));
}

// (device, handle) -> cudaError_t, with the GIL released: fn(device, handle)
template <int (*fn)(int, uintptr_t)>
PyObject* device_call(PyObject*, PyObject* args) {
  int device;
  unsigned long long handle;
  if (!PyArg_ParseTuple(args, "iK", &device, &handle)) return nullptr;
  int err;
  Py_BEGIN_ALLOW_THREADS err = fn(device, handle);
  Py_END_ALLOW_THREADS return PyLong_FromLong(err);
}

PyObject* py_cuda_memcpy_h2d_async(PyObject*, PyObject* args) {
  int device;
  unsigned long long dst, src, n, stream;
  if (!PyArg_ParseTuple(args, "iKKKK", &device, &dst, &src, &n, &stream)) return nullptr;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::memcpy_h2d_async(device, as_ptr(dst), as_ptr(src), n, stream);
  Py_END_ALLOW_THREADS return PyLong_FromLong(err);
}

PyObject* py_cuda_event_create(PyObject*, PyObject* args) {
  int device;
  if (!PyArg_ParseTuple(args, "i", &device)) return nullptr;
  uintptr_t ev = 0;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::event_create(device, &ev);
  Py_END_ALLOW_THREADS return Py_BuildValue("(iK)", err, static_cast<unsigned long long>(ev));
}

PyObject* py_cuda_event_record(PyObject*, PyObject* args) {
  int device;
  unsigned long long ev, stream;
  if (!PyArg_ParseTuple(args, "iKK", &device, &ev, &stream)) return nullptr;
  int err;
  Py_BEGIN_ALLOW_THREADS err = cuda::event_record(device, ev, stream);
  Py_END_ALLOW_THREADS return PyLong_FromLong(err);
}

PyObject* py_fastcdc_cuts(PyObject*, PyObject* args) {
  Py_buffer buf;
  unsigned long long mn, avg, mx;
  int final;
  if (!PyArg_ParseTuple(args, "y*KKKp", &buf, &mn, &avg, &mx, &final)) return nullptr;
  if (mn == 0 || mn > avg || avg > mx) {
    PyBuffer_Release(&buf);
    PyErr_SetString(PyExc_ValueError, "fastcdc_cuts needs 0 < min <= avg <= max");
    return nullptr;
  }
  std::vector<uint64_t> lengths;
  Py_BEGIN_ALLOW_THREADS fastcdc_cuts(static_cast<const uint8_t*>(buf.buf),
                                      static_cast<size_t>(buf.len), mn, avg, mx, final != 0,
                                      lengths);
  Py_END_ALLOW_THREADS PyBuffer_Release(&buf);
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(lengths.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < lengths.size(); ++i)
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyLong_FromUnsignedLongLong(lengths[i]));
  return list;
}

PyObject* py_gear_table(PyObject*, PyObject*) {
  PyObject* list = PyList_New(256);
  if (list == nullptr) return nullptr;
  const uint64_t* g = gear_table();
  for (int i = 0; i < 256; ++i) PyList_SET_ITEM(list, i, PyLong_FromUnsignedLongLong(g[i]));
  return list;
}

PyMethodDef methods[] = {
    {"pread_into", py_pread_into, METH_VARARGS,
     "pread_into(fd, offset, addr, length) -> bytes read (short at EOF) or -errno"},
    {"memcpy", py_memcpy, METH_VARARGS, "memcpy(dst_addr, src_addr, n)"},
    {"touch_pages", py_touch_pages, METH_VARARGS,
     "touch_pages(addr, length, page) -> sum of one byte per page (GIL released)"},
    {"cached_fraction", py_cached_fraction, METH_VARARGS,
     "cached_fraction(fd, size, max_pages) -> share of sampled pages in the page cache"},
    {"host_alloc", py_host_alloc, METH_VARARGS,
     "host_alloc(nbytes, pinned, device=0) -> (addr, kind, cuda_err); addr 0 on failure"},
    {"host_free", py_host_free, METH_VARARGS, "host_free(addr, nbytes, kind, device=0)"},
    {"cuda_load", py_cuda_load, METH_VARARGS,
     "cuda_load(mapped, paths) -> device count or -1 (mapped: tried with RTLD_NOLOAD first)"},
    {"cuda_runtime_path", py_cuda_runtime_path, METH_NOARGS,
     "the file the CUDA runtime was loaded from ('' before)"},
    {"cuda_get_device", py_cuda_get_device, METH_NOARGS, "-> (err, current device)"},
    {"cuda_copy", py_cuda_copy, METH_VARARGS,
     "cuda_copy(device, dst, src, n, stream, event) -> cudaError_t, once src is read"},
    {"cuda_stream_wait", py_cuda_stream_wait, METH_VARARGS,
     "cuda_stream_wait(device, stream, other, event): stream waits for other's work so far"},
    {"cuda_why", py_cuda_why, METH_NOARGS, "why the CUDA runtime is not usable ('' if it is)"},
    {"cuda_error_string", py_cuda_error_string, METH_VARARGS, "name of a cudaError_t"},
    {"cuda_host_register", py_cuda_host_register, METH_VARARGS, "-> cudaError_t"},
    {"cuda_host_unregister", py_cuda_host_unregister, METH_VARARGS, "-> cudaError_t"},
    {"cuda_stream_create", py_cuda_stream_create, METH_VARARGS, "-> (err, stream)"},
    {"cuda_stream_destroy", device_call<cuda::stream_destroy>, METH_VARARGS,
     "cuda_stream_destroy(device, stream) -> cudaError_t"},
    {"cuda_stream_synchronize", device_call<cuda::stream_synchronize>, METH_VARARGS,
     "cuda_stream_synchronize(device, stream) -> cudaError_t"},
    {"cuda_memcpy_h2d_async", py_cuda_memcpy_h2d_async, METH_VARARGS,
     "cuda_memcpy_h2d_async(device, dst, src, n, stream) -> cudaError_t"},
    {"cuda_event_create", py_cuda_event_create, METH_VARARGS, "-> (err, event)"},
    {"cuda_event_record", py_cuda_event_record, METH_VARARGS, "-> cudaError_t"},
    {"cuda_event_query", device_call<cuda::event_query>, METH_VARARGS,
     "cuda_event_query(device, event) -> 0 done, 600 pending, else err"},
    {"cuda_event_synchronize", device_call<cuda::event_synchronize>, METH_VARARGS,
     "cuda_event_synchronize(device, event) -> cudaError_t"},
    {"cuda_event_destroy", device_call<cuda::event_destroy>, METH_VARARGS,
     "cuda_event_destroy(device, event) -> cudaError_t"},
    {"fastcdc_cuts", py_fastcdc_cuts, METH_VARARGS,
     "fastcdc_cuts(buffer, min, avg, max, final) -> list of chunk lengths"},
    {"gear_table", py_gear_table, METH_NOARGS, "the chunker's 256 gear values"},
    {"loop_new", binding::py_loop_new, METH_VARARGS,
     "loop_new(device, stream, ring, slots, slot_bytes, readers, files, tensor_chunks) -> "
     "(cudaError_t, loop or None); files: (fd, direct_fd, size, block, sums)"},
    {"loop_submit", binding::py_loop_submit, METH_VARARGS,
     "loop_submit(loop, [(id, file, offset, length, skip, copy_len, dst, tensors)])"},
    {"loop_wait", binding::py_loop_wait, METH_VARARGS,
     "loop_wait(loop, timeout) -> (whole tensors, bytes, failures, cancelled); blocks"},
    {"loop_cancel", binding::py_loop_cancel, METH_VARARGS, "loop_cancel(loop): stop taking jobs"},
    {"loop_close", binding::py_loop_close, METH_VARARGS,
     "loop_close(loop): cancel, join, wait until no copy reads the ring"},
    {"loop_stats", binding::py_loop_stats, METH_VARARGS, "loop_stats(loop) -> dict of counters"},
    {"crc32", binding::py_crc32, METH_VARARGS, "crc32(buffer, start=0) -> zlib-compatible CRC-32"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "warmstart._native",
                      "warmstart native core: positional reads, host memory, CUDA copies.", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }

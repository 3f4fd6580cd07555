// The CUDA runtime, resolved at run time with dlopen so the same build runs without CUDA.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace warmstart::cuda {

// Tries the already-loaded runtime first (torch usually loaded one), then the sonames,
// then `extra_path` when non-empty. Returns the device count, or -1 with why() set.
int load(const std::string& extra_path);
bool loaded();
std::string why();

// Every call below returns a cudaError_t code (0 is success); error_string names it.
const char* error_string(int code);
int set_device(int device);
void* host_alloc(uint64_t nbytes);
void host_free(void* ptr);
int host_register(void* ptr, uint64_t nbytes);
int host_unregister(void* ptr);
int stream_create(int device, uintptr_t* out);
int stream_destroy(int device, uintptr_t stream);
int stream_synchronize(int device, uintptr_t stream);
int memcpy_h2d_async(int device, void* dst, const void* src, uint64_t n, uintptr_t stream);
int event_create(int device, uintptr_t* out);
int event_record(int device, uintptr_t event, uintptr_t stream);
int event_query(int device, uintptr_t event);  // 0 done, 600 (cudaErrorNotReady) pending
int event_synchronize(int device, uintptr_t event);
int event_destroy(int device, uintptr_t event);

}  // namespace warmstart::cuda

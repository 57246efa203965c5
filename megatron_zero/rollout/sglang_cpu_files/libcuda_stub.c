/* A CUDA driver library that reports no device: what SGLang 0.5.23 needs to start on a machine without a GPU.
 *
 * Why: SGLang's CPU path imports sgl_kernel unconditionally (srt/.../cache_move.py), and the CUDA build of
 * sgl_kernel that PyPI ships links libcuda.so.1, the NVIDIA driver's library, which only a GPU machine has. With
 * this library (soname libcuda.so.1) first on LD_LIBRARY_PATH the import succeeds; every entry point answers
 * CUDA_ERROR_NO_DEVICE (100), the symbol look-ups CUDA_ERROR_NOT_FOUND (500), so torch.cuda.is_available() stays
 * False and no kernel of sgl_kernel can run. The entry points are those the CPU server was seen to resolve
 * (../shared/reference/SGLANG-CPU.md). Built by megatron_zero/rollout/sglang_cpu.py, only when no GPU is present.
 */
#define NO_DEVICE 100
#define NOT_FOUND 500

int cuInit(unsigned int flags) { return NO_DEVICE; }
int cuDriverGetVersion(int *version) { if (version) *version = 0; return NO_DEVICE; }
int cuDeviceGetCount(int *count) { if (count) *count = 0; return NO_DEVICE; }
int cuGetProcAddress(const char *symbol, void **fn, int version, unsigned long long flags) {
    if (fn) *fn = 0;
    return NOT_FOUND;
}
int cuGetProcAddress_v2(const char *symbol, void **fn, int version, unsigned long long flags, void *status) {
    if (fn) *fn = 0;
    return NOT_FOUND;
}
int cuGetErrorString(int error, const char **text) {
    if (text) *text = "no CUDA device (megatron-zero's CPU driver stub)";
    return 0;
}
int cuPointerGetAttribute(void *data, int attribute, unsigned long long pointer) { return NO_DEVICE; }
int cuCtxFromGreenCtx(void **ctx, void *green) { return NO_DEVICE; }
int cuCtxPopCurrent_v2(void **ctx) { return NO_DEVICE; }
int cuCtxPushCurrent_v2(void *ctx) { return NO_DEVICE; }
int cuDevResourceGenerateDesc(void **desc, void *resources, unsigned int count) { return NO_DEVICE; }
int cuDevSmResourceSplitByCount(void *result, unsigned int *groups, const void *input, void *remaining,
                                unsigned int flags, unsigned int min_count) { return NO_DEVICE; }
int cuDeviceGetDevResource(int device, void *resource, int type) { return NO_DEVICE; }
int cuGreenCtxCreate(void **green, void *desc, int device, unsigned int flags) { return NO_DEVICE; }
int cuGreenCtxDestroy(void *green) { return NO_DEVICE; }
int cuGreenCtxGetDevResource(void *green, void *resource, int type) { return NO_DEVICE; }
int cuStreamCreate(void **stream, unsigned int flags) { return NO_DEVICE; }

// Activation binarisation kernels: SIDU's threshold masks and FEM's k-sigma masks.
// CUDA twins of reference.threshold_masks and reference.ksigma_binarize.

// out = [a > tau] as 0/1 floats (the comparison in float32, as NumPy does for a float32
// array against a Python float).
extern "C" __global__ void threshold_masks_f32(const float* __restrict__ a, float* __restrict__ out,
                                               long long n, float tau) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        out[i] = __ldg(a + i) > tau ? 1.0f : 0.0f;
    }
}

// Sum of `v` over the block, in double; every thread gets the result. `scratch` holds one
// double per warp. Launch with blockDim.x a multiple of 32 and at most 1024.
__device__ double block_sum(double v, double* scratch) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? scratch[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    const double total = scratch[0];
    __syncthreads();  // scratch is reused by the next call
    return total;
}

// FEM: per channel k, μ_k and the population σ_k over its hw values (two passes, in
// double), binary = [A_k >= μ_k + K·σ_k] and mu[k] = μ_k. One block per channel.
extern "C" __global__ void ksigma_binarize_f32(const float* __restrict__ a, float* __restrict__ binary,
                                               float* __restrict__ mu, int channels, int hw, double k_sigma) {
    __shared__ double scratch[32];
    for (int ch = blockIdx.x; ch < channels; ch += gridDim.x) {
        const float* src = a + (long long)ch * hw;
        double s = 0.0;
        for (int p = threadIdx.x; p < hw; p += blockDim.x) s += (double)__ldg(src + p);
        const double mean = block_sum(s, scratch) / hw;
        double sq = 0.0;
        for (int p = threadIdx.x; p < hw; p += blockDim.x) {
            const double d = (double)__ldg(src + p) - mean;
            sq += d * d;
        }
        const double sigma = sqrt(block_sum(sq, scratch) / hw);
        const double threshold = mean + k_sigma * sigma;
        float* dst = binary + (long long)ch * hw;
        for (int p = threadIdx.x; p < hw; p += blockDim.x) dst[p] = (double)__ldg(src + p) >= threshold ? 1.0f : 0.0f;
        if (threadIdx.x == 0) mu[ch] = (float)mean;
    }
}

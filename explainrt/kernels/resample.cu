// Bilinear mask resampling kernels: the CUDA twins of kernels/reference.py.
//
// Sampling positions are not computed here: the host derives, per axis, two taps (source
// index, weight) for every position of the (virtual) resized length from
// reference._full_matrix, so the GPU samples exactly where the NumPy reference does
// (half-pixel centres, "clamp" or "reflect" border, the in_len == 1 case). A tap table
// for an axis of resized length L is `idx[2L]` (int) and `wt[2L]` (float): position j reads
// idx[2j] with weight wt[2j] and idx[2j+1] with weight wt[2j+1].
//
// RISE's upsample-then-crop is a table over the full resized length plus a per-mask
// offset (dy, dx): output row y reads table row y + dy.
//
// Compiled at run time by CuPy (NVRTC) and to PTX by the CPU tests (nvcc); no headers.

#define OPT_SHIFT 1
#define OPT_SCALE 2
#define OPT_OFFSETS 4

// Σ_a Ry[y,a] Σ_b Rx[x,b] M[a,b] with the reference's association: rows first, then columns.
__device__ __forceinline__ float sample_bilinear(const float* __restrict__ mask, int w,
                                                 const int* __restrict__ ty_idx, const float* __restrict__ ty_wt,
                                                 const int* __restrict__ tx_idx, const float* __restrict__ tx_wt,
                                                 int row, int col) {
    const int y0 = __ldg(ty_idx + 2 * row), y1 = __ldg(ty_idx + 2 * row + 1);
    const float wy0 = __ldg(ty_wt + 2 * row), wy1 = __ldg(ty_wt + 2 * row + 1);
    const int x0 = __ldg(tx_idx + 2 * col), x1 = __ldg(tx_idx + 2 * col + 1);
    const float wx0 = __ldg(tx_wt + 2 * col), wx1 = __ldg(tx_wt + 2 * col + 1);
    const float c0 = wy0 * __ldg(mask + y0 * w + x0) + wy1 * __ldg(mask + y1 * w + x0);
    const float c1 = wy0 * __ldg(mask + y0 * w + x1) + wy1 * __ldg(mask + y1 * w + x1);
    return wx0 * c0 + wx1 * c1;
}

// Row/column of the full resized mask that output pixel (y, x) of mask i reads; offsets are
// clamped into the table so a bad offset can never read out of bounds.
__device__ __forceinline__ void source_position(const int* __restrict__ offsets, int options, long long i,
                                                int y, int x, int H, int W, int full_h, int full_w,
                                                int* row, int* col) {
    int dy = 0, dx = 0;
    if (options & OPT_OFFSETS) {
        dy = __ldg(offsets + 2 * i);
        dx = __ldg(offsets + 2 * i + 1);
        dy = max(0, min(dy, full_h - H));
        dx = max(0, min(dx, full_w - W));
    }
    *row = y + dy;
    *col = x + dx;
}

__device__ __forceinline__ void store_value(float* p, float v) { *p = v; }

// float16 stored as its bit pattern (round to nearest even), so no cuda_fp16.h is needed.
__device__ __forceinline__ void store_value(unsigned short* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    *p = h;
}

// out[i, c, y, x] = x[c, y, x] * ((up(masks[i])(y, x) + shift[i]) * scale[i]).
// One thread per (mask, pixel): the mask value is computed once and written for every channel.
template <typename OutT>
__device__ __forceinline__ void masked_batch_body(
    const float* __restrict__ image, const float* __restrict__ masks, const float* __restrict__ shift,
    const float* __restrict__ scale, const int* __restrict__ offsets, int options,
    const int* __restrict__ ty_idx, const float* __restrict__ ty_wt,
    const int* __restrict__ tx_idx, const float* __restrict__ tx_wt,
    OutT* __restrict__ out, int n, int channels, int h, int w, int H, int W, int full_h, int full_w) {
    const long long plane = (long long)H * W;
    const long long total = (long long)n * plane;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long i = t / plane;
        const long long p = t - i * plane;
        const int y = (int)(p / W), x = (int)(p - (long long)y * W);
        int row, col;
        source_position(offsets, options, i, y, x, H, W, full_h, full_w, &row, &col);
        float m = sample_bilinear(masks + i * (long long)h * w, w, ty_idx, ty_wt, tx_idx, tx_wt, row, col);
        if (options & OPT_SHIFT) m += __ldg(shift + i);
        if (options & OPT_SCALE) m *= __ldg(scale + i);
        OutT* dst = out + i * channels * plane + p;
        const float* src = image + p;
        for (int c = 0; c < channels; ++c) store_value(dst + c * plane, __ldg(src + c * plane) * m);
    }
}

extern "C" __global__ void masked_batch_f32(
    const float* __restrict__ image, const float* __restrict__ masks, const float* __restrict__ shift,
    const float* __restrict__ scale, const int* __restrict__ offsets, int options,
    const int* __restrict__ ty_idx, const float* __restrict__ ty_wt,
    const int* __restrict__ tx_idx, const float* __restrict__ tx_wt,
    float* __restrict__ out, int n, int channels, int h, int w, int H, int W, int full_h, int full_w) {
    masked_batch_body<float>(image, masks, shift, scale, offsets, options, ty_idx, ty_wt, tx_idx, tx_wt, out, n,
                             channels, h, w, H, W, full_h, full_w);
}

extern "C" __global__ void masked_batch_f16(
    const float* __restrict__ image, const float* __restrict__ masks, const float* __restrict__ shift,
    const float* __restrict__ scale, const int* __restrict__ offsets, int options,
    const int* __restrict__ ty_idx, const float* __restrict__ ty_wt,
    const int* __restrict__ tx_idx, const float* __restrict__ tx_wt,
    unsigned short* __restrict__ out, int n, int channels, int h, int w, int H, int W, int full_h, int full_w) {
    masked_batch_body<unsigned short>(image, masks, shift, scale, offsets, options, ty_idx, ty_wt, tx_idx, tx_wt,
                                      out, n, channels, h, w, H, W, full_h, full_w);
}

// out[i, y, x] = up(masks[i])(y, x), optionally cropped from the full resized size.
extern "C" __global__ void upsample_bilinear_f32(
    const float* __restrict__ masks, const int* __restrict__ offsets, int options,
    const int* __restrict__ ty_idx, const float* __restrict__ ty_wt,
    const int* __restrict__ tx_idx, const float* __restrict__ tx_wt,
    float* __restrict__ out, int n, int h, int w, int H, int W, int full_h, int full_w) {
    const long long plane = (long long)H * W;
    const long long total = (long long)n * plane;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long i = t / plane;
        const long long p = t - i * plane;
        const int y = (int)(p / W), x = (int)(p - (long long)y * W);
        int row, col;
        source_position(offsets, options, i, y, x, H, W, full_h, full_w, &row, &col);
        out[t] = sample_bilinear(masks + i * (long long)h * w, w, ty_idx, ty_wt, tx_idx, tx_wt, row, col);
    }
}

// Per-mask min and max of up(masks[i]) over H×W without materialising it: one block per
// mask, a grid-stride loop over pixels, then a warp-shuffle + shared-memory reduction.
// Launch with blockDim.x a multiple of 32 and at most 1024.
extern "C" __global__ void upsampled_minmax_f32(
    const float* __restrict__ masks, const int* __restrict__ ty_idx, const float* __restrict__ ty_wt,
    const int* __restrict__ tx_idx, const float* __restrict__ tx_wt,
    float* __restrict__ lo, float* __restrict__ hi, int n, int h, int w, int H, int W) {
    __shared__ float warp_lo[32];
    __shared__ float warp_hi[32];
    const int plane = H * W;
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const float* mask = masks + (long long)i * h * w;
        float vmin = __int_as_float(0x7f800000);   // +inf
        float vmax = __int_as_float(0xff800000);   // -inf
        for (int p = threadIdx.x; p < plane; p += blockDim.x) {
            const int y = p / W, x = p - y * W;
            const float v = sample_bilinear(mask, w, ty_idx, ty_wt, tx_idx, tx_wt, y, x);
            vmin = fminf(vmin, v);
            vmax = fmaxf(vmax, v);
        }
        for (int off = 16; off > 0; off >>= 1) {
            vmin = fminf(vmin, __shfl_down_sync(0xffffffffu, vmin, off));
            vmax = fmaxf(vmax, __shfl_down_sync(0xffffffffu, vmax, off));
        }
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
        if (lane == 0) {
            warp_lo[warp] = vmin;
            warp_hi[warp] = vmax;
        }
        __syncthreads();
        if (warp == 0) {
            vmin = lane < warps ? warp_lo[lane] : __int_as_float(0x7f800000);
            vmax = lane < warps ? warp_hi[lane] : __int_as_float(0xff800000);
            for (int off = 16; off > 0; off >>= 1) {
                vmin = fminf(vmin, __shfl_down_sync(0xffffffffu, vmin, off));
                vmax = fmaxf(vmax, __shfl_down_sync(0xffffffffu, vmax, off));
            }
            if (lane == 0) {
                lo[i] = vmin;
                hi[i] = vmax;
            }
        }
        __syncthreads();  // the shared slots are reused by the next mask of this block
    }
}

#define MAX_TARGETS_PER_PASS 8

// RISE weighting: acc[t, y, x] += Σ_i weights[i, t] · crop_i(up(grids[i]))(y, x) for targets
// t0 .. t0+tn-1 (tn <= MAX_TARGETS_PER_PASS). Each mask is regenerated from its s×s grid
// and offset inside the loop, so no full-resolution mask ever exists in memory. Blocks along
// y split the masks (each sums its share in double registers, then one atomicAdd per pixel
// and target), so a 224×224 map still fills the GPU. `acc` (float64, zeroed) is the sum.
extern "C" __global__ void weighted_crop_sum_f32(
    const float* __restrict__ grids, const int* __restrict__ offsets, const float* __restrict__ weights,
    const int* __restrict__ ty_idx, const float* __restrict__ ty_wt,
    const int* __restrict__ tx_idx, const float* __restrict__ tx_wt,
    double* __restrict__ acc, int n, int targets, int t0, int tn, int h, int w, int H, int W,
    int full_h, int full_w) {
    const long long plane = (long long)H * W;
    const int per_split = (n + gridDim.y - 1) / gridDim.y;
    const int begin = blockIdx.y * per_split;
    const int end = min(n, begin + per_split);
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < plane;
         p += (long long)blockDim.x * gridDim.x) {
        const int y = (int)(p / W), x = (int)(p - (long long)y * W);
        double sum[MAX_TARGETS_PER_PASS];
#pragma unroll
        for (int k = 0; k < MAX_TARGETS_PER_PASS; ++k) sum[k] = 0.0;
        for (int i = begin; i < end; ++i) {
            int row, col;
            source_position(offsets, OPT_OFFSETS, i, y, x, H, W, full_h, full_w, &row, &col);
            const double m = (double)sample_bilinear(grids + (long long)i * h * w, w, ty_idx, ty_wt, tx_idx, tx_wt,
                                                     row, col);
            const float* wrow = weights + (long long)i * targets + t0;
#pragma unroll
            for (int k = 0; k < MAX_TARGETS_PER_PASS; ++k) {
                if (k < tn) sum[k] += (double)__ldg(wrow + k) * m;
            }
        }
        if (begin < end) {
#pragma unroll
            for (int k = 0; k < MAX_TARGETS_PER_PASS; ++k) {
                if (k < tn) atomicAdd(acc + (long long)(t0 + k) * plane + p, sum[k]);
            }
        }
    }
}

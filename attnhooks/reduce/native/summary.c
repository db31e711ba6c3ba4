/* One pass over a block of attention log-probabilities: every row reduction of a summary.
 *
 * Built at first use by attnhooks/native/__init__.py (the machine's C compiler, -O3, its own
 * vector instructions) and called through ctypes once per block (struct attnhooks_block below).
 * The block's tasks, a head by a cell of rows each, are shared among OpenMP threads: torch's own
 * pool when built with -fopenmp next to torch's libgomp, else one thread. Plain C99, libm only,
 * no global state.
 *
 * Each row of `n` floats holds log p = s * scale - lse (plus the mask's bias), -inf where the mask
 * hides a key; keys outside the row's causal / sliding-window range are hidden by index. The row
 * becomes its probabilities p in place, and gives:
 *   entropy      -sum_j p_j log p_j (log p floored at `floor`, as for p)
 *   sink         sum of p over keys [0, sinks)
 *   band[w]      p of key band_own + r - w (0 outside the block)
 *   topw, topi   the K largest p, largest first, and their keys + index_base
 *   colsum       += p, one row of column sums per cell
 *   pmax         max of p over the cell's rows and keys [c * cb, (c + 1) * cb), per cell
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One block: `heads` heads (batch and heads flattened) by `rows` query rows by `n` keys. Row
 * bins of `rb` rows are cut into `parts` cells of `cell` rows (the last may be short); each cell
 * has its own row of column sums and of overview maxima. Outputs are block-local, [heads, rows]
 * (entropy, sink), [heads, rows, band_width] and [heads, rows, topk]; `sink`, `band`, `topw` /
 * `topi` and `pmax` may be NULL (not wanted). Mirrored by attnhooks/native/__init__.py. */
struct attnhooks_block {
    float* x;                  /* [heads, rows, n] log p (-inf: hidden), becomes p */
    int64_t heads, rows, n;
    int64_t own;               /* key index of row 0's own position (causal, window) */
    int64_t causal, window;    /* window -1: none */
    float floor;               /* log p below it counts as it (exp stays normal) */
    float* entropy;
    float* sink;
    int64_t sinks;             /* keys [0, sinks) */
    float* band;
    int64_t band_width, band_own; /* band: key band_own + r - w of row r */
    float* topw;
    int32_t* topi;
    int64_t topk, tb;          /* top-k search: keys dealt into groups of about tb */
    int64_t index_base;        /* added to topi */
    float* colsum;             /* [heads, cells, n] */
    float* pmax;               /* [heads, cells, nkb] */
    int64_t rb, parts, cell, cb, nkb;
    int64_t threads;
};

/* e^x for x in [-87, 88]: 2^n * e^r, |r| <= ln2 / 2, a degree-6 polynomial (error ~1 ulp);
 * written so that the compiler vectorises it (no libm call, no branch). */
static inline float exp_f32(float x) {
    /* n = round(x / ln 2): adding and removing 1.5 * 2^23 rounds to an integer */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* p = e^(log p) of one key, and in `c` the log p its entropy term uses (floored at `floor`, at most
 * 88); -inf (hidden) gives p = 0, NaN stays NaN. */
static inline float prob(float v, float floor, float* c) {
    *c = v >= floor ? (v <= 88.0f ? v : 88.0f) : floor; /* NaN: floor here, NaN below */
    float e = exp_f32(*c);
    return v == -INFINITY ? 0.0f : (v != v ? v : e);
}

/* Insert p (key j) into the K largest so far, kept in descending order (of equal values, the one
 * inserted first stays ahead). */
static inline void top_insert(float* tw, int32_t* ti, int64_t* count, int64_t K, float p, int32_t j) {
    int64_t pos = *count < K ? (*count)++ : K - 1;
    while (pos > 0 && tw[pos - 1] < p) {
        tw[pos] = tw[pos - 1];
        ti[pos] = ti[pos - 1];
        pos--;
    }
    tw[pos] = p;
    ti[pos] = j;
}

/* The K largest p of a row. Its keys are dealt into `nb` groups, key j into group j % nb, and
 * peaks[g] is the largest p of group g (one vectorised pass of elementwise maxima). The keys of
 * the K groups with the largest peaks hold the K largest p: a key outside them has K larger
 * peaks, so K larger keys, ahead of it. The K-th largest peak is a lower bound on the K-th
 * largest p: only keys at or above it are looked at. */
static void top_row(const float* row, int64_t n, float* peaks, int64_t nb, int64_t K, float* tw, int32_t* ti,
                    int64_t base) {
    for (int64_t g = 0; g < nb; g++) peaks[g] = row[g];
    for (int64_t j0 = nb; j0 < n; j0 += nb) {
        const float* slab = row + j0;
        int64_t m = n - j0 < nb ? n - j0 : nb;
#pragma omp simd
        for (int64_t g = 0; g < m; g++) peaks[g] = slab[g] > peaks[g] ? slab[g] : peaks[g];
    }
    int64_t count = 0;
    for (int64_t g = 0; g < nb; g++) {
        if (count < K || peaks[g] > tw[K - 1]) top_insert(tw, ti, &count, K, peaks[g], (int32_t)g);
    }
    float bound = count == K ? tw[K - 1] : 0.0f;
    count = 0;
    for (int64_t g = 0; g < nb; g++) {
        if (peaks[g] < bound) continue;
        for (int64_t j = g; j < n; j += nb) {
            if (row[j] >= bound && (count < K || row[j] > tw[K - 1])) top_insert(tw, ti, &count, K, row[j], (int32_t)j);
        }
    }
    for (int64_t i = 0; i < count; i++) ti[i] += (int32_t)base;
}

/* Max-pool a cell's elementwise maxima `mx` (keys [lo, hi) seen) into bins of `cb` keys, into `pm`. */
static void pool_max(float* pm, const float* mx, int64_t lo, int64_t hi, int64_t n, int64_t cb) {
    int64_t first = lo / cb, last = hi == 0 ? 0 : (hi - 1) / cb + 1;
    for (int64_t c = first; c < last; c++) {
        int64_t j0 = c * cb, j1 = j0 + cb < n ? j0 + cb : n;
        float peak = pm[c];
#pragma omp simd reduction(max : peak)
        for (int64_t j = j0; j < j1; j++) peak = mx[j] > peak ? mx[j] : peak;
        pm[c] = peak;
    }
}

/* The rows of one task: `rows` rows of `n` keys; their column sums and elementwise maxima go
 * to one cell (`colsum`, `pmax`: one row each). Returns 0, or -1 when its scratch could not be
 * allocated. */
static int rows_pass(const struct attnhooks_block* b, float* x, int64_t rows, int64_t own, int64_t band_own,
                     float* entropy, float* sink, float* band, float* topw, int32_t* topi, float* cs, float* pmax) {
    int64_t n = b->n;
    int64_t nb = topw ? (n + b->tb - 1) / b->tb : 0;
    float* peaks = nb ? malloc(sizeof(float) * nb) : NULL;
    float* mx = pmax ? calloc(n, sizeof(float)) : NULL; /* elementwise maxima of the rows */
    if ((nb && !peaks) || (pmax && !mx)) {
        free(peaks);
        free(mx);
        return -1;
    }
    memset(cs, 0, sizeof(float) * n);
    if (pmax) memset(pmax, 0, sizeof(float) * b->nkb);
    const float floor = b->floor;
    int64_t seen_lo = n, seen_hi = 0; /* the keys the rows see */
    for (int64_t r = 0; r < rows; r++) {
        float* row = x + r * n;
        int64_t lo = 0, hi = n;
        if (b->causal) {
            hi = own + r + 1;
            hi = hi < 0 ? 0 : (hi > n ? n : hi);
        }
        if (b->window >= 0) {
            lo = own + r - b->window + 1;
            lo = lo < 0 ? 0 : (lo > hi ? hi : lo);
        }
        seen_lo = lo < seen_lo ? lo : seen_lo;
        seen_hi = hi > seen_hi ? hi : seen_hi;
        for (int64_t j = 0; j < lo; j++) row[j] = 0.0f;
        for (int64_t j = hi; j < n; j++) row[j] = 0.0f;
        float h = 0.0f;
        if (mx) { /* two loops rather than a test per key: both vectorise */
#pragma omp simd reduction(+ : h)
            for (int64_t j = lo; j < hi; j++) {
                float c, p = prob(row[j], floor, &c);
                h += p * c;
                row[j] = p;
                cs[j] += p;
                mx[j] = p > mx[j] ? p : mx[j];
            }
        } else {
#pragma omp simd reduction(+ : h)
            for (int64_t j = lo; j < hi; j++) {
                float c, p = prob(row[j], floor, &c);
                h += p * c;
                row[j] = p;
                cs[j] += p;
            }
        }
        entropy[r] = -h;
        if (sink) {
            float s = 0.0f;
            int64_t m = b->sinks < n ? b->sinks : n;
            for (int64_t j = 0; j < m; j++) s += row[j];
            sink[r] = s;
        }
        if (band) {
            int64_t W = b->band_width;
            for (int64_t w = 0; w < W; w++) {
                int64_t j = band_own + r - w;
                band[r * W + w] = j >= 0 && j < n ? row[j] : 0.0f;
            }
        }
        if (peaks) top_row(row, n, peaks, nb, b->topk, topw + r * b->topk, topi + r * b->topk, b->index_base);
    }
    if (mx) pool_max(pmax, mx, seen_lo, seen_hi, n, b->cb);
    free(peaks);
    free(mx);
    return 0;
}

/* Every row of the block, its tasks (a head by a part of a row bin) shared among `threads`
 * threads. Returns 0, or -1 when some task's scratch could not be allocated. */
int attnhooks_summary_block(const struct attnhooks_block* b) {
    int64_t nrb = (b->rows + b->rb - 1) / b->rb, cells = nrb * b->parts, tasks = b->heads * cells;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(b->threads) reduction(| : failed)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t h = t / cells, cell = t % cells, bin = cell / b->parts, part = cell % b->parts;
        int64_t r0 = bin * b->rb + part * b->cell;
        int64_t end = (bin + 1) * b->rb < b->rows ? (bin + 1) * b->rb : b->rows;
        int64_t r1 = r0 + b->cell < end ? r0 + b->cell : end;
        float* cs = b->colsum + (h * cells + cell) * b->n;
        float* pm = b->pmax ? b->pmax + (h * cells + cell) * b->nkb : NULL;
        if (r0 >= r1) { /* a cell past the last row: nothing to add */
            memset(cs, 0, sizeof(float) * b->n);
            if (pm) memset(pm, 0, sizeof(float) * b->nkb);
            continue;
        }
        int64_t at = h * b->rows + r0; /* row of the block's [heads, rows, ...] outputs */
        failed |= rows_pass(b, b->x + at * b->n, r1 - r0, b->own + r0, b->band_own + r0, b->entropy + at,
                            b->sink ? b->sink + at : NULL, b->band ? b->band + at * b->band_width : NULL,
                            b->topw ? b->topw + at * b->topk : NULL, b->topw ? b->topi + at * b->topk : NULL, cs, pm);
    }
    return failed ? -1 : 0;
}

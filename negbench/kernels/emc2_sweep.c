/* The fused EMC² sweep on the CPU: one call per step, chains in parallel, proposals in
 * sequence, random numbers generated here. The contract is negbench.kernels.emc2.fused_sweep;
 * it must match the pure-PyTorch reference (negbench.samplers.emc2.reference_sweep) bit for bit.
 * Plain C99 without torch headers, so it builds in well under a second; built at first use and
 * loaded with ctypes. IEEE float semantics are part of the contract: never build with
 * -ffast-math, and keep -ffp-contract=off (no FMAs: the log and the products must round as in
 * PyTorch).
 *
 * Row r's random numbers: Philox-4x32-10 (Salmon et al., SC 2011) of the counter
 * (j, r, step, 0) under the key (key0, key1), for j < ceil(k/2): words 0 and 1 are the sort
 * keys of columns 2j and 2j+1, words 2 and 3 give log U of proposals 2j and 2j+1, with
 * U = ((x >> 8) + 1) 2^-24 and log U from FreeBSD's logf without its special cases
 * (negbench/kernels/philox.py is the reference). The proposals are the valid columns c < k in
 * ascending order of (key, c); proposal t < n is accepted when log U_t < l_t - l, l_t =
 * float(beta * sims[r, c_t]) and l the stored log score. The states after steps
 * t >= floor(burn_in * n) are recorded and their normalised histogram is the row of weights.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NOT_RECORDED (-2)
#define OUT_OF_BATCH (-1)
#define BLOCK 16 /* Philox counters per vectorised block */
#define NUM_TALLIES 5

/* Phase timers for benchmarks/emc2_sweep_ab.sh (cycles per phase, one thread); compiled out
 * unless NEGBENCH_PHASE_TIMERS is defined. */
#ifdef NEGBENCH_PHASE_TIMERS
#include <x86intrin.h>
uint64_t negbench_emc2_phase_cycles[5]; /* valid columns, Philox and log U, sort, MH, W */
#define PHASE_START() uint64_t phase_clock_ = __rdtsc()
#define PHASE_END(i)                                                                             \
    do {                                                                                         \
        const uint64_t now_ = __rdtsc();                                                         \
        negbench_emc2_phase_cycles[i] += now_ - phase_clock_;                                    \
        phase_clock_ = now_;                                                                     \
    } while (0)
#else
#define PHASE_START() ((void)0)
#define PHASE_END(i) ((void)0)
#endif

/* ---- Philox-4x32-10 and the log-uniform ------------------------------------------------------ */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* Philox-4x32-10 of the counters (j0 + i, c1, c2, c3), i < BLOCK: x[w][i] is word w. One
 * lane at a time with the rounds inside, which compilers vectorise across lanes (the 32x32 ->
 * 64-bit products become packed multiplies). The key is bumped after every round; the last
 * bump is unused, so this is the published schedule (a bump before rounds 2..10). */
__attribute__((noinline)) static void philox_block(uint32_t j0, uint32_t c1_, uint32_t c2_, uint32_t c3_, uint32_t key0,
                                                  uint32_t key1, uint32_t x[4][BLOCK]) {
    for (int i = 0; i < BLOCK; ++i) {
        uint32_t c0 = j0 + (uint32_t)i, c1 = c1_, c2 = c2_, c3 = c3_, k0 = key0, k1 = key1;
        for (int round = 0; round < 10; ++round) {
            const uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
            c0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
            c2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        x[0][i] = c0;
        x[1][i] = c1;
        x[2][i] = c2;
        x[3][i] = c3;
    }
}

/* log U, U = ((x >> 8) + 1) 2^-24 = n 2^-24, with float32 +, -, *, / only: FreeBSD's logf
 * (the constants are its hexadecimal ones) without its special cases; see philox.py. The
 * reduction U = 2^k (1 + f), sqrt(2)/2 <= 1 + f < sqrt(2), is done on the integer n
 * (2^m <= n < 2^(m+1)), the same k and 1 + f as from U's float bits, without type punning, so
 * that compilers vectorise it. */
static float log_uniform(uint32_t x) {
    const uint32_t n = (x >> 8) + 1;
    const int32_t m = 31 - __builtin_clz(n);
    const uint32_t t = m <= 23 ? n << (23 - m) : n >> 1; /* 2^23 <= t < 2^24: U's significand (n <= 2^24) */
    const int32_t up = (int32_t)(((t & 0x007FFFFF) + 0x4AFB20) & 0x00800000) >> 23; /* 1 + f >= sqrt(2) */
    const float f = (float)(int32_t)t * (up ? 0x1p-24f : 0x1p-23f) - 1.0f;
    const float dk = (float)(m - 24 + up);
    const float s = f / (f + 2.0f);
    const float z = s * s, w = z * z;
    const float t1 = w * (0xccce13.0p-25f + w * 0xf89e26.0p-26f);
    const float t2 = z * (0xaaaaaa.0p-24f + w * 0x91e9ee.0p-25f);
    const float r = t2 + t1, hfsq = 0.5f * f * f;
    return dk * 0xb17180.0p-24f - ((hfsq - (s * (hfsq + r) + dk * 0x97f7d1.0p-40f)) - f);
}

/* Sort keys of columns [0, k) and log U of proposals [0, k) of one row; keys and log_u hold
 * padded(k) entries (a multiple of 2 BLOCK), so the loops need no bounds. */
static int64_t padded(int64_t k) { return (k + 2 * BLOCK - 1) / (2 * BLOCK) * (2 * BLOCK); }

/* A separate loop over restrict pointers, so that it is vectorised. */
__attribute__((noinline)) static void log_uniforms(const uint32_t *restrict bits, float *restrict out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = log_uniform(bits[i]);
}

static void row_random(uint32_t row, uint32_t step, uint32_t key0, uint32_t key1, int64_t k,
                       uint32_t *restrict keys, uint32_t *restrict bits, float *restrict log_u) {
    uint32_t x[4][BLOCK];
    for (int64_t j0 = 0; 2 * j0 < k; j0 += BLOCK) {
        philox_block((uint32_t)j0, row, step, 0, key0, key1, x);
        for (int i = 0; i < BLOCK; ++i) {
            keys[2 * j0 + 2 * i] = x[0][i];
            keys[2 * j0 + 2 * i + 1] = x[1][i];
            bits[2 * j0 + 2 * i] = x[2][i];
            bits[2 * j0 + 2 * i + 1] = x[3][i];
        }
    }
    log_uniforms(bits, log_u, padded(k));
}

/* For the known-answer tests: Philox-4x32-10 of one counter, and log U of n words. */
void negbench_emc2_philox(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t x[4][BLOCK];
    philox_block(counter[0], counter[1], counter[2], counter[3], key[0], key[1], x);
    for (int w = 0; w < 4; ++w) out[w] = x[w][0];
}

void negbench_emc2_log_uniform(const uint32_t *bits, float *out, int64_t n) { log_uniforms(bits, out, n); }

/* ---- the proposal order ------------------------------------------------------------------------ */
/* order[0..n) = the columns cols[0..n) (ascending) sorted by (keys[col], col): a counting sort
 * into 2n buckets by the key's top bits, in column order, then an insertion sort, which only
 * fixes the order inside buckets (expected O(n) for uniform keys). Scratch: sorted (n), bucket
 * (n), start (2n + 1). */
static void order_by_key(const uint32_t *keys, const int32_t *cols, int32_t n, int32_t *order,
                         uint32_t *sorted, int32_t *bucket, int32_t *start) {
    const uint64_t buckets = 2 * (uint64_t)n;
    memset(start, 0, (size_t)(buckets + 1) * sizeof(int32_t));
    for (int32_t i = 0; i < n; ++i) {
        bucket[i] = (int32_t)(((uint64_t)keys[cols[i]] * buckets) >> 32);
        start[bucket[i] + 1]++;
    }
    int32_t run = 0; /* in a register: start[b + 1] += start[b] would wait on store forwarding */
    for (uint64_t b = 0; b <= buckets; ++b) {
        run += start[b];
        start[b] = run;
    }
    for (int32_t i = 0; i < n; ++i) {
        const int32_t at = start[bucket[i]]++;
        order[at] = cols[i];
        sorted[at] = keys[cols[i]];
    }
    for (int32_t i = 1; i < n; ++i) {
        const uint32_t key = sorted[i];
        if (!(key < sorted[i - 1])) continue;
        const int32_t column = order[i];
        int32_t j = i;
        do {
            sorted[j] = sorted[j - 1];
            order[j] = order[j - 1];
            --j;
        } while (j > 0 && key < sorted[j - 1]);
        sorted[j] = key;
        order[j] = column;
    }
}

/* ---- the sweep ---------------------------------------------------------------------------------- */
typedef struct {
    int32_t *order, *cols, *bucket, *start, *count;
    uint32_t *keys, *sorted, *bits;
    float *log_u;
} scratch_t;

static void *scratch_alloc(scratch_t *s, int64_t k, int64_t ld) {
    /* int32: order, cols, bucket (k each), start (2k + 1), sorted (k), count (ld + 1: the
     * records per column, the last a sink for records on no column); keys, bits (uint32) and
     * log_u (float): padded(k) each */
    const int64_t kp = padded(k);
    int32_t *q = malloc((size_t)(6 * k + 1 + (ld + 1) + 3 * kp) * sizeof(int32_t));
    if (q == NULL) return NULL;
    s->order = q;
    s->cols = q + k;
    s->bucket = q + 2 * k;
    s->start = q + 3 * k;
    s->sorted = (uint32_t *)(q + 5 * k + 1);
    s->keys = (uint32_t *)(q + 6 * k + 1);
    s->bits = (uint32_t *)(q + 6 * k + 1 + kp);
    s->log_u = (float *)(q + 6 * k + 1 + 2 * kp);
    s->count = q + 6 * k + 1 + 3 * kp;
    return q;
}

/* The arguments every row shares. */
typedef struct {
    const void *sims;
    int32_t sims_double;
    const uint8_t *valid;
    int64_t k, ld;
    double beta, burn_in;
    uint32_t key0, key1, step;
} sweep_t;

/* One row in flight: its proposals (s->order, s->log_u: n of them, the first burn not
 * recorded), its chain's (state, current), and what it has counted: count[c] records on each
 * column c < ld, count[ld] those on none. */
typedef struct {
    scratch_t *s;
    int64_t row_at, state, burn, late_accepted, out_of_batch;
    int64_t *records; /* k entries, or NULL */
    float current;
    int32_t n, accepted;
} row_t;

/* Row r's valid columns, random numbers and proposal order; zeroes its counts. */
static void prepare_row(const sweep_t *a, scratch_t *s, int64_t r, int64_t *records, row_t *row) {
    const int64_t k = a->k, row_at = r * a->ld;
    const size_t elt = a->sims_double ? sizeof(double) : sizeof(float);
    PHASE_START();
    int32_t n = 0;
    for (int64_t c = 0; c < k; ++c)
        if (a->valid[row_at + c]) s->cols[n++] = (int32_t)c;
    PHASE_END(0);
    /* The MH steps read the row's scores in random order: request them now, while Philox
     * computes, rather than miss on each line there. */
    for (int64_t c = 0; c < k; c += (int64_t)(64 / elt)) __builtin_prefetch((const char *)a->sims + (size_t)(row_at + c) * elt);
    row_random((uint32_t)r, a->step, a->key0, a->key1, k, s->keys, s->bits, s->log_u);
    PHASE_END(1);
    order_by_key(s->keys, s->cols, n, s->order, s->sorted, s->bucket, s->start);
    memset(s->count, 0, (size_t)(a->ld + 1) * sizeof(int32_t));
    PHASE_END(2);
    row->s = s;
    row->row_at = row_at;
    row->records = records;
    row->n = n;
    row->burn = (int64_t)floor(a->burn_in * (double)n); /* >= 0: burn_in is in [0, 0.99] */
    row->accepted = 0;
    row->late_accepted = row->out_of_batch = 0;
}

/* The log score of proposal column c: beta * s in the sims dtype, then rounded to float32. */
static inline float logit(const sweep_t *a, int64_t at, float beta_f) {
    return a->sims_double ? (float)(a->beta * ((const double *)a->sims)[at]) : beta_f * ((const float *)a->sims)[at];
}

/* One Metropolis-Hastings step on proposal column c: accept iff log U < l - current, by selects
 * (no branch: an accept is a coin flip the branch predictor cannot learn). */
static inline int mh_step(float l, int64_t c, float log_u, int64_t *state, float *current) {
    const int accept = log_u < l - *current;
    *state = accept ? c : *state;
    *current = accept ? l : *current;
    return accept;
}

/* The state after a recorded step, counted on its column or on the sink count[ld]. */
static inline void count_state(int32_t *count, int64_t state, int64_t ld) {
    count[(uint64_t)state < (uint64_t)ld ? state : ld] += 1; /* 0 <= state < ld */
}

/* One row's steps, any dtype, with or without records. */
static void sweep_one(const sweep_t *a, row_t *row) {
    const scratch_t *s = row->s;
    const float beta_f = (float)a->beta;
    const int64_t ld = a->ld, at = row->row_at;
    int64_t state = row->state, late = 0, out_of_batch = 0;
    float current = row->current;
    int accepted = 0;
    for (int64_t t = 0; t < row->burn; ++t) {
        const int64_t c = s->order[t];
        accepted |= mh_step(logit(a, at + c, beta_f), c, s->log_u[t], &state, &current);
        if (row->records) row->records[t] = NOT_RECORDED;
    }
    for (int64_t t = row->burn; t < row->n; ++t) {
        const int64_t c = s->order[t];
        late += mh_step(logit(a, at + c, beta_f), c, s->log_u[t], &state, &current);
        if (row->records) row->records[t] = state;
        out_of_batch += state == OUT_OF_BATCH;
        count_state(s->count, state, ld);
    }
    row->state = state;
    row->current = current;
    row->accepted = accepted | (late > 0);
    row->late_accepted = late;
    row->out_of_batch = out_of_batch;
}

#define GROUP 4 /* chains swept in lockstep */

/* GROUP rows' steps in lockstep, float32 scores, no records, the same n (so the same burn-in):
 * one row's steps are a dependency chain (subtract, compare, select) that its latency, not its
 * work, bounds; four independent chains overlap (benchmarks: 2.1 against 0.6-0.9 ns a step).
 * Written out by hand so that the states stay in registers. Identical arithmetic to sweep_one. */
static void sweep_group(const sweep_t *a, row_t *rows) {
    const float beta_f = (float)a->beta;
    const int64_t ld = a->ld, burn = rows[0].burn, n = rows[0].n;
    const float *sims = (const float *)a->sims;
#define ROW_VARS(g)                                                                            \
    const int32_t *order##g = rows[g].s->order;                                                \
    const float *log_u##g = rows[g].s->log_u, *sims##g = sims + rows[g].row_at;                 \
    int32_t *count##g = rows[g].s->count;                                                      \
    int64_t state##g = rows[g].state, late##g = 0, oob##g = 0;                                 \
    float current##g = rows[g].current;                                                        \
    int accepted##g = 0;
    ROW_VARS(0)
    ROW_VARS(1)
    ROW_VARS(2)
    ROW_VARS(3)
#define STEP(g) mh_step(beta_f * sims##g[order##g[t]], order##g[t], log_u##g[t], &state##g, &current##g)
    for (int64_t t = 0; t < burn; ++t) {
        accepted0 |= STEP(0);
        accepted1 |= STEP(1);
        accepted2 |= STEP(2);
        accepted3 |= STEP(3);
    }
#define RECORDED_STEP(g)                                                                       \
    late##g += STEP(g);                                                                        \
    oob##g += state##g == OUT_OF_BATCH;                                                        \
    count_state(count##g, state##g, ld);
    for (int64_t t = burn; t < n; ++t) {
        RECORDED_STEP(0)
        RECORDED_STEP(1)
        RECORDED_STEP(2)
        RECORDED_STEP(3)
    }
#define ROW_OUT(g)                                                                             \
    rows[g].state = state##g;                                                                  \
    rows[g].current = current##g;                                                              \
    rows[g].accepted = accepted##g | (late##g > 0);                                            \
    rows[g].late_accepted = late##g;                                                           \
    rows[g].out_of_batch = oob##g;
    ROW_OUT(0)
    ROW_OUT(1)
    ROW_OUT(2)
    ROW_OUT(3)
#undef ROW_VARS
#undef STEP
#undef RECORDED_STEP
#undef ROW_OUT
}

/* Sweep rows[0..G): in lockstep when sweep_group applies, else one after another. */
static void sweep_rows(const sweep_t *a, row_t *rows, int G) {
    PHASE_START();
    int lockstep = G == GROUP && !a->sims_double;
    for (int g = 0; g < G; ++g) lockstep &= rows[g].records == NULL && rows[g].n == rows[0].n;
    if (lockstep)
        sweep_group(a, rows);
    else
        for (int g = 0; g < G; ++g) sweep_one(a, &rows[g]);
    PHASE_END(3);
}

/* A swept row's weights W = counts / used, one pass over the row (0 where nothing was
 * recorded), as the reference divides: the counts are exact integers in either dtype; its
 * remaining records and its tallies (records on a column, used, are those not on the sink). */
static void finish_row(const sweep_t *a, const row_t *row, int64_t *tally, void *weights) {
    PHASE_START();
    const int64_t ld = a->ld, k = a->k, recorded = row->n > row->burn ? row->n - row->burn : 0;
    const int32_t *count = row->s->count;
    const int64_t used = recorded - count[ld];
    int64_t extra = 0;
    for (int64_t i = k; i < ld; ++i) extra += count[i];
    if (a->sims_double) {
        double *w = (double *)weights + row->row_at;
        const double u = (double)used;
        for (int64_t i = 0; i < ld; ++i) w[i] = used ? (double)count[i] / u : 0.0;
    } else {
        float *w = (float *)weights + row->row_at;
        const float u = (float)used;
        for (int64_t i = 0; i < ld; ++i) w[i] = used ? (float)count[i] / u : 0.0f;
    }
    if (row->records)
        for (int64_t t = row->n; t < k; ++t) row->records[t] = NOT_RECORDED;
    tally[0] = row->late_accepted;
    tally[1] = recorded;
    tally[2] = used;
    tally[3] = row->out_of_batch;
    tally[4] = extra;
    PHASE_END(4);
}

/* sims, weights: rows x ld (float32, or float64 when sims_double); valid: rows x ld bytes.
 * Proposals come from columns [0, k); start columns are below ld. Outputs per row: final
 * column, score, accepted (any), tallies (accepted after burn-in, records, records on a column
 * >= 0, on OUT_OF_BATCH, on a column >= k), the row of weights, and the records (rows x k, may
 * be NULL). Returns 0, or -1 when out of memory. Chains are swept GROUP at a time: for each view
 * p, the GROUP chains' rows, then (pairs) the next view from where each chain ended. */
int negbench_emc2_sweep(const void *sims, int32_t sims_double, const uint8_t *valid, int64_t rows, int64_t k,
                        int64_t ld, double beta, double burn_in, uint32_t key0, uint32_t key1, uint32_t step,
                        const int64_t *column, const float *score, int32_t pairs, int64_t *out_column,
                        float *out_score, uint8_t *out_accepted, int64_t *out_tallies, void *weights,
                        int64_t *records, int32_t num_threads) {
    const int64_t per_chain = pairs ? 2 : 1;
    const int64_t chains = rows / per_chain;
    const sweep_t args = {sims, sims_double, valid, k, ld, beta, burn_in, key0, key1, step};
    int failed = 0;
    (void)num_threads;
#pragma omp parallel num_threads(num_threads) if (rows * k >= 65536) reduction(|| : failed)
    {
        scratch_t s[GROUP];
        void *block[GROUP];
        int missing = 0;
        for (int g = 0; g < GROUP; ++g) missing |= (block[g] = scratch_alloc(&s[g], k, ld)) == NULL;
        if (missing) failed = 1;
#pragma omp for schedule(static)
        for (int64_t first = 0; first < chains; first += GROUP) {
            if (missing) continue;
            const int G = chains - first < GROUP ? (int)(chains - first) : GROUP;
            row_t group[GROUP];
            for (int64_t p = 0; p < per_chain; ++p) {
                for (int g = 0; g < G; ++g) {
                    const int64_t r = (first + g) * per_chain + p;
                    const int moved = p > 0 && group[g].accepted;
                    prepare_row(&args, &s[g], r, records ? records + r * k : NULL, &group[g]);
                    if (p == 0) {
                        group[g].state = column[r];
                        group[g].current = score[r];
                    } else if (!moved) {
                        group[g].state = column[r]; /* the stored state's column for this view */
                    }
                }
                sweep_rows(&args, group, G);
                for (int g = 0; g < G; ++g) {
                    const int64_t r = (first + g) * per_chain + p;
                    finish_row(&args, &group[g], out_tallies + r * NUM_TALLIES, weights);
                    out_column[r] = group[g].state;
                    out_score[r] = group[g].current;
                    out_accepted[r] = (uint8_t)group[g].accepted;
                }
            }
        }
        for (int g = 0; g < GROUP; ++g) free(block[g]);
    }
    return failed ? -1 : 0;
}

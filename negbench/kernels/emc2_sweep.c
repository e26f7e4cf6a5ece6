/* The fused EMC² sweep on the CPU: one call per step, chains in parallel, proposals in
 * sequence. The contract is negbench.kernels.emc2.fused_sweep; it must match the pure-PyTorch
 * reference (negbench.samplers.emc2.reference_sweep) bit for bit. Plain C99 without torch
 * headers, so it builds in well under a second; built at first use and loaded with ctypes.
 *
 * Row r visits the columns of keys[r, :] in the order of a stable ascending argsort (ties by
 * column, NaN last: torch.argsort(stable=True)); its t-th proposal c has log score
 * logits[r, c]. Proposal t < num_proposals[r] is accepted when log_u[r, t] < logits[r, c] - l,
 * l the stored log score, in float32 with IEEE semantics (never build with -ffast-math). The
 * state after each step t >= burn_in[r] is recorded. With pairs != 0, rows 2k and 2k+1 are one
 * chain: row 2k+1 starts from the score and state row 2k ended on (from its own start column if
 * row 2k accepted nothing).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NOT_RECORDED (-2)
#define OUT_OF_BATCH (-1)

/* A bucket that never decreases with the key: keys <= 0 first, [0, 1) spread evenly over the
 * buckets, keys >= 1 and NaN last (NaN sorts after every number, as in torch). */
static int32_t bucket_of(float key, int32_t buckets) {
    const float x = key * (float)buckets;
    if (!(x < (float)buckets)) return buckets - 1;
    return x > 0.0f ? (int32_t)x : 0;
}

static int key_less(float a, float b) { return a < b || (isnan(b) && !isnan(a)); }

/* order[0..k) = stable argsort of keys[0..k): a counting sort into 2k buckets in column order,
 * then an insertion sort, which only fixes the order inside buckets (expected O(k) for uniform
 * keys). Scratch: sorted (k floats), bucket (k), start (2k + 1). */
static void stable_argsort(const float *keys, int32_t k, int32_t *order, float *sorted,
                           int32_t *bucket, int32_t *start) {
    const int32_t buckets = 2 * k;
    memset(start, 0, (size_t)(buckets + 1) * sizeof(int32_t));
    for (int32_t c = 0; c < k; ++c) {
        bucket[c] = bucket_of(keys[c], buckets);
        start[bucket[c] + 1]++;
    }
    for (int32_t b = 0; b < buckets; ++b) start[b + 1] += start[b];
    for (int32_t c = 0; c < k; ++c) {
        const int32_t at = start[bucket[c]]++;
        order[at] = c;
        sorted[at] = keys[c];
    }
    for (int32_t i = 1; i < k; ++i) {
        const float key = sorted[i];
        if (!key_less(key, sorted[i - 1])) continue;
        const int32_t column = order[i];
        int32_t j = i;
        do {
            sorted[j] = sorted[j - 1];
            order[j] = order[j - 1];
            --j;
        } while (j > 0 && key_less(key, sorted[j - 1]));
        sorted[j] = key;
        order[j] = column;
    }
}

/* counts[row + column] += n (exact: counts are integers far below 2^24). Adding a run of
 * records at once keeps the loop free of a dependency through memory. */
static void add_count(void *counts, int32_t count_double, int64_t row, int64_t count_columns,
                      int64_t column, int64_t n) {
    if (counts == NULL || n == 0 || column < 0 || column >= count_columns) return;
    if (count_double)
        ((double *)counts)[row + column] += (double)n;
    else
        ((float *)counts)[row + column] += (float)n;
}

/* Outputs per row: final column, score, accepted (any), accepted after burn-in, and tallies of
 * the records (used = on an in-batch column, out of batch, recorded at all). records (R x k) and
 * counts (R x count_columns, zeroed by the caller; float32, or float64 when count_double) may be
 * NULL. counts[r, x] += 1 for every record x >= 0. Returns 0, or -1 when out of memory. */
int negbench_emc2_sweep(const float *logits, const float *keys, const float *log_u,
                        const int64_t *num_proposals, const int64_t *burn_in,
                        const int64_t *column, const float *score, int64_t rows, int64_t k,
                        int32_t pairs, int64_t *out_column, float *out_score,
                        uint8_t *out_accepted, int64_t *out_accepted_late, int64_t *out_used,
                        int64_t *out_out_of_batch, int64_t *out_recorded, int64_t *records,
                        void *counts, int64_t count_columns, int32_t count_double,
                        int32_t num_threads) {
    const int64_t per_chain = pairs ? 2 : 1;
    const int64_t chains = rows / per_chain;
    int failed = 0;
    (void)num_threads;
#pragma omp parallel num_threads(num_threads) if (rows * k >= 65536) reduction(|| : failed)
    {
        /* order, bucket: k each; start: 2k + 1; sorted: k floats */
        int32_t *scratch = malloc((size_t)(4 * k + 1) * sizeof(int32_t) + (size_t)k * sizeof(float));
        int32_t *order = scratch, *bucket = scratch + k, *start = scratch + 2 * k;
        float *sorted = (float *)(scratch + 4 * k + 1);
        if (scratch == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t chain = 0; chain < chains; ++chain) {
            if (scratch == NULL) continue;
            int64_t state = 0;
            float current = 0.0f;
            uint8_t moved = 0;
            for (int64_t p = 0; p < per_chain; ++p) {
                const int64_t r = chain * per_chain + p;
                const float *row_logits = logits + r * k, *row_log_u = log_u + r * k;
                int64_t *row_records = records ? records + r * k : NULL;
                if (p == 0) {
                    state = column[r];
                    current = score[r];
                } else if (!moved) {
                    state = column[r]; /* the stored state's column for this view */
                }
                stable_argsort(keys + r * k, (int32_t)k, order, sorted, bucket, start);
                const int64_t n = num_proposals[r] < k ? num_proposals[r] : k, burn = burn_in[r];
                int64_t late_accepted = 0, used = 0, out_of_batch = 0, recorded = 0;
                int64_t run_state = -1, run = 0; /* records of the current state not yet counted */
                uint8_t accepted = 0;
                for (int64_t t = 0; t < n; ++t) {
                    const int64_t c = order[t];
                    const float s = row_logits[c];
                    const int accept = row_log_u[t] < s - current;
                    if (accept) {
                        state = c;
                        current = s;
                        accepted = 1;
                    }
                    if (t < burn) {
                        if (row_records) row_records[t] = NOT_RECORDED;
                        continue;
                    }
                    late_accepted += accept;
                    recorded++;
                    if (row_records) row_records[t] = state;
                    if (state >= 0) {
                        used++;
                        if (state != run_state) {
                            add_count(counts, count_double, r * count_columns, count_columns, run_state, run);
                            run_state = state;
                            run = 0;
                        }
                        run++;
                    } else if (state == OUT_OF_BATCH) {
                        out_of_batch++;
                    }
                }
                add_count(counts, count_double, r * count_columns, count_columns, run_state, run);
                if (row_records)
                    for (int64_t t = n > 0 ? n : 0; t < k; ++t) row_records[t] = NOT_RECORDED;
                out_column[r] = state;
                out_score[r] = current;
                out_accepted[r] = accepted;
                out_accepted_late[r] = late_accepted;
                out_used[r] = used;
                out_out_of_batch[r] = out_of_batch;
                out_recorded[r] = recorded;
                moved = accepted;
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

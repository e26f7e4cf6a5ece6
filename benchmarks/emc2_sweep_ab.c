/* Interleaved A/B of builds of the fused EMC² sweep (negbench/kernels/emc2_sweep.c): each
 * library in turn on the same inputs, the bench's sampler-only shape (rows = 2B views, K = 2B
 * proposal columns, float32 scores ~ U(-0.15, 0.15) like cosine similarities of random 128-d
 * unit vectors, beta = 5, burn-in 0.5, one thread, no records), process CPU time. Prints each
 * library's median ms, its ratio to the first library's median, whether its outputs (columns,
 * tallies, weights) equal the first's, and, for a build with -DNEGBENCH_PHASE_TIMERS, cycles per
 * proposal in each phase. Driven by emc2_sweep_ab.sh. */
#define _POSIX_C_SOURCE 199309L
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*sweep_fn)(const void *, int32_t, const uint8_t *, int64_t, int64_t, int64_t, double, double, uint32_t,
                        uint32_t, uint32_t, const int64_t *, const float *, int32_t, int64_t *, float *, uint8_t *,
                        int64_t *, void *, int64_t *, int32_t);

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s BATCH_SIZE REPEATS LIB.so [LIB.so ...]\n", argv[0]);
        return 2;
    }
    const int64_t batch = atoll(argv[1]), rows = 2 * batch, k = 2 * batch, ld = 2 * batch;
    const int repeats = atoi(argv[2]), libs = argc - 3;
    sweep_fn sweep[16];
    uint64_t *phases[16];
    for (int v = 0; v < libs && v < 16; ++v) {
        void *handle = dlopen(argv[3 + v], RTLD_NOW | RTLD_LOCAL);
        if (handle == NULL) {
            fprintf(stderr, "%s\n", dlerror());
            return 2;
        }
        sweep[v] = (sweep_fn)dlsym(handle, "negbench_emc2_sweep");
        phases[v] = (uint64_t *)dlsym(handle, "negbench_emc2_phase_cycles");
    }
    float *sims = malloc((size_t)(rows * ld) * sizeof(float));
    uint8_t *valid = malloc((size_t)(rows * ld));
    uint32_t lcg = 1;
    for (int64_t i = 0; i < rows * ld; ++i) {
        lcg = lcg * 1664525u + 1013904223u;
        sims[i] = ((float)(lcg >> 8) * (1.0f / 16777216.0f) * 2 - 1) * 0.15f;
        valid[i] = 1;
    }
    int64_t *column = malloc((size_t)rows * 8), *out_column = malloc((size_t)rows * 8);
    int64_t *tallies = malloc((size_t)rows * 5 * 8);
    float *score = malloc((size_t)rows * 4), *out_score = malloc((size_t)rows * 4);
    float *weights = malloc((size_t)(rows * ld) * sizeof(float));
    uint8_t *accepted = malloc((size_t)rows);
    for (int64_t r = 0; r < rows; ++r) {
        column[r] = r % k;
        score[r] = 5 * sims[r * ld + r % k];
    }
    double *times = malloc(sizeof(double) * (size_t)(repeats * libs));
    uint64_t digest[16] = {0};
    for (int i = 0; i < repeats; ++i)
        for (int v = 0; v < libs; ++v) {
            const double start = cpu_seconds();
            sweep[v](sims, 0, valid, rows, k, ld, 5.0, 0.5, 123, 456, (uint32_t)i, column, score, 1, out_column,
                     out_score, accepted, tallies, weights, NULL, 1);
            times[v * repeats + i] = cpu_seconds() - start;
            uint64_t h = digest[v];
            for (int64_t r = 0; r < rows; ++r) {
                h = h * 31 + (uint64_t)out_column[r];
                for (int j = 0; j < 5; ++j) h = h * 31 + (uint64_t)tallies[r * 5 + j];
            }
            for (int64_t j = 0; j < rows * ld; j += 7) {
                uint32_t bits;
                memcpy(&bits, &weights[j], 4);
                h = h * 31 + bits;
            }
            digest[v] = h;
        }
    double first = 0;
    for (int v = 0; v < libs; ++v) {
        qsort(times + v * repeats, (size_t)repeats, sizeof(double), by_value);
        const double median = times[v * repeats + repeats / 2];
        if (v == 0) first = median;
        printf("%-40s B=%-5lld median %8.3f ms  x first %.3f  outputs %s", argv[3 + v], (long long)batch, median * 1e3,
               median / first, digest[v] == digest[0] ? "equal" : "DIFFER");
        if (phases[v]) {
            const double per = (double)repeats * (double)rows * (double)k;
            printf("  cycles/proposal: valid %.2f, Philox+logU %.2f, sort %.2f, MH %.2f, W %.2f", phases[v][0] / per,
                   phases[v][1] / per, phases[v][2] / per, phases[v][3] / per, phases[v][4] / per);
        }
        printf("\n");
    }
    return 0;
}

/* Status codes and the thread-local error message. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static _Thread_local char last_error[512];

int mrt_abi_version(void) { return MRT_ABI_VERSION; }

const char *mrt_last_error(void) { return last_error; }

void mrt_clear_error(void) { last_error[0] = '\0'; }

int mrt_fail(int code, const char *file, int line, const char *fmt, ...) {
    const char *base = strrchr(file, '/');
    int k = snprintf(last_error, sizeof last_error, "%s:%d: ", base ? base + 1 : file, line);
    if (k < 0 || (size_t)k >= sizeof last_error) return code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error + k, sizeof last_error - (size_t)k, fmt, ap);
    va_end(ap);
    return code;
}

static int thread_setting = 0; /* 0: automatic */

void mrt_set_threads(int n) { thread_setting = n < 0 ? 0 : n; }

int mrt_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 8 ? 8 : (int)n);
}

int mrt_threads(int automatic) {
    int n = thread_setting > 0 ? thread_setting : automatic;
    return n < 1 ? 1 : (n > 8 ? 8 : n);
}

void mrt_parallel(void *(*fn)(void *), void *jobs, size_t size, int n) {
    pthread_t th[8];
    int started[8] = {0};
    if (n > 8) n = 8;
    for (int t = 1; t < n; t++) started[t] = pthread_create(&th[t], NULL, fn, (char *)jobs + t * size) == 0;
    if (n > 0) fn(jobs);
    for (int t = 1; t < n; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            fn((char *)jobs + t * size); /* could not start a thread: run its share here */
    }
}

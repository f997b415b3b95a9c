/* signal.c: process signals: Ctrl-C and SIGTERM for the runner, and a last
 * word when a thread worker dies of a fatal signal.
 *
 * The first SIGINT or SIGTERM is recorded and wakes the home loop, which
 * cancels the main task and ends the process with status 128 + signal; a
 * second one ends the process at once. A fatal signal (SIGSEGV, SIGBUS,
 * SIGFPE, SIGILL, SIGABRT) in a worker thread writes which worker and which
 * method were running, then hands the signal to the handler that was there
 * before (the default one, or a sanitizer's), which ends the process.
 * Everything a handler does is async-signal-safe: atomics, write(2),
 * uv_async_send, _exit.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* ======================================================================== */
/* SIGINT and SIGTERM                                                        */
/* ======================================================================== */

static atomic_int stop_count;
static atomic_int stop_pending;          /* the signal number, until taken */
static _Atomic(uv_async_t *) stop_async; /* read by the handler, on any thread */

static void on_stop_signal(int sig) {
  if (atomic_fetch_add(&stop_count, 1) >= 1) _exit(128 + sig);
  atomic_store(&stop_pending, sig);
  uv_async_t *a = atomic_load(&stop_async);
  if (a != NULL) uv_async_send(a); /* async-signal-safe */
}

void corral__signal_catch_stop(corral_context *c) {
  atomic_store(&stop_async, &c->async);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
}

int corral__signal_take_stop(void) { return atomic_exchange(&stop_pending, 0); }

/* The signal was handled without ending the process (the REPL cancelled a
 * line): the next one is handled too, rather than ending the process. */
void corral__signal_rearm(void) { atomic_store(&stop_count, 0); }

void corral__signal_release(corral_context *c) {
  if (atomic_load(&stop_async) != &c->async) return;
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  atomic_store(&stop_async, NULL);
}

/* ======================================================================== */
/* Fatal signals in worker threads                                           */
/* ======================================================================== */

static const int fatal_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
#define NFATAL ((int)(sizeof fatal_signals / sizeof fatal_signals[0]))
static struct sigaction fatal_prev[NFATAL];
static uv_once_t fatal_once = UV_ONCE_INIT;

/* The worker this thread runs (set at the thread's start, so that the
 * handler never causes the first access to this thread-local). */
static _Thread_local corral_worker *this_worker;

static void put(const char *s) {
  ssize_t rc = write(2, s, strlen(s));
  (void)rc;
}

static void on_fatal(int sig, siginfo_t *info, void *uctx) {
  (void)uctx;
  corral_worker *w = this_worker;
  int i = 0;
  while (i < NFATAL && fatal_signals[i] != sig)
    i++;
  if (w != NULL) {
    put("corral: worker ");
    put(w->name);
    put(" died of signal ");
    put(sig == SIGSEGV  ? "SIGSEGV"
        : sig == SIGBUS ? "SIGBUS"
        : sig == SIGFPE ? "SIGFPE"
        : sig == SIGILL ? "SIGILL"
                        : "SIGABRT");
    if (w->current[0] != '\0') {
      put(" while running method ");
      put(w->current);
    }
    put(" (a crash in C code: the process ends)\n");
  }
  /* The previous handler takes it from here: returning re-runs a fault; a
   * signal that was sent (abort, kill) is sent again. */
  sigaction(sig, i < NFATAL ? &fatal_prev[i] : NULL, NULL);
  if (info == NULL || info->si_code <= 0) raise(sig);
}

static void fatal_install(void) {
  for (int i = 0; i < NFATAL; i++) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(fatal_signals[i], &sa, &fatal_prev[i]);
  }
}

void *corral__signal_enter_worker(corral_worker *w) {
  uv_once(&fatal_once, fatal_install);
  this_worker = w;
  /* a stack of its own for the handler, so that a C stack overflow is told */
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_size = (size_t)64 * 1024;
  ss.ss_sp = malloc(ss.ss_size);
  if (ss.ss_sp != NULL && sigaltstack(&ss, NULL) != 0) {
    free(ss.ss_sp);
    ss.ss_sp = NULL;
  }
  return ss.ss_sp;
}

void corral__signal_leave_worker(void *altstack) {
  this_worker = NULL;
  if (altstack == NULL) return;
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_flags = SS_DISABLE;
  sigaltstack(&ss, NULL);
  free(altstack);
}

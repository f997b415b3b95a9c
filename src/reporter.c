/* reporter.c: reporters of unretrieved errors: the text of a failure that
 * nobody retrieved, written to stderr when its reporter is collected or the
 * process exits, unless disarmed first. Nothing here runs Lua or takes a
 * lock (reporters fire from a __gc): it writes with write(2).
 */
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

void corral__reporter_init(corral_reporter *r, corral_context *c, const char *text, size_t len) {
  r->armed = 1;
  r->f = NULL;
  r->len = len;
  memcpy(r->text, text, len);
  queue_insert_tail(&c->reporters, &r->node);
}

void corral__reporter_attach(corral_reporter *r, corral_future *f) {
  if (r->f != NULL) return;
  corral_future_retain(f);
  r->f = f;
}

/* Write it (once), if still armed and its failure is not a call's to report. */
static void fire(corral_reporter *r) {
  if (!r->armed) return;
  r->armed = 0;
  if (r->f != NULL && corral__future_reported_elsewhere(r->f)) return;
  ssize_t rc = write(2, r->text, r->len);
  (void)rc;
}

void corral__reporter_disarm(corral_reporter *r) {
  if (!r->armed) return;
  r->armed = 0;
  queue_remove(&r->node);
}

void corral__reporter_collected(corral_reporter *r) {
  fire(r);
  queue_remove(&r->node);      /* (a no-op once disarmed: queue_remove unlinks for good) */
  corral_future_release(r->f); /* atomic: no lock in a __gc */
  r->f = NULL;
}

void corral__reporter_all(corral_context *c) {
  for (queue *q = queue_head(&c->reporters); q != &c->reporters; q = q->next)
    fire(queue_data(q, corral_reporter, node));
}

/* The home contexts of runtimes that a Lua host made (`require "corral"`),
 * reported by an atexit hook: a host may end without closing its Lua state
 * (Neovim does), and then no __gc ever fires. Slots, not a list: adding and
 * removing (the runtime's __gc) take no lock. The hook runs in the thread
 * that calls exit(), the host's Lua thread in practice; it runs no Lua and
 * only writes what reporter_all writes. */
#define EXIT_SLOTS 64
static _Atomic(corral_context *) exit_slots[EXIT_SLOTS];
static atomic_flag exit_hooked = ATOMIC_FLAG_INIT;

static void report_at_exit(void) {
  for (int i = 0; i < EXIT_SLOTS; i++) {
    corral_context *c = atomic_exchange(&exit_slots[i], NULL);
    if (c != NULL) corral__reporter_all(c);
  }
}

/* The hook must outlive a dlclose of the module that set it (closing a Lua
 * state unloads corral.so; glibc then runs the hook at once, but a
 * sanitizer's atexit keeps it for the exit): the module stays loaded. */
static void pin_module(void) {
  Dl_info info;
  if (dladdr((void *)report_at_exit, &info) != 0 && info.dli_fname != NULL)
    (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

int corral__reporter_at_exit(corral_context *c) {
  if (!atomic_flag_test_and_set(&exit_hooked)) {
    pin_module();
    if (atexit(report_at_exit) != 0) return -1;
  }
  for (int i = 0; i < EXIT_SLOTS; i++) {
    corral_context *none = NULL;
    if (atomic_compare_exchange_strong(&exit_slots[i], &none, c)) return 0;
  }
  return -1; /* (more live runtimes than slots: reported at close only) */
}

void corral__reporter_at_exit_remove(corral_context *c) {
  for (int i = 0; i < EXIT_SLOTS; i++) {
    corral_context *mine = c;
    if (atomic_compare_exchange_strong(&exit_slots[i], &mine, NULL)) return;
  }
}

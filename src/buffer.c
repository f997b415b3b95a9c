/* buffer.c: bytes shared by reference between contexts (corral.buffer).
 *
 * A buffer is a counted block of bytes. It is writable until it first
 * crosses to another context (`shared`), and immutable from then on, so
 * that every holder reads the same bytes without a lock. Large buffers
 * live in a memfd mapped MAP_SHARED, so that another process can map the
 * same pages; small ones on the heap. Before such a buffer first goes to
 * another process, it is sealed (its own mapping made read-only, then no
 * write, shrink or grow: F_SEAL_*), and a process maps only sealed memfds:
 * no process can change the bytes another reads, nor shrink the file under
 * its mapping (SIGBUS). The last release frees it: lock-free (a __gc may
 * release), so its handle stops resolving first (handle.c).
 */
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define SHM_MIN ((size_t)64 * 1024) /* from this size a buffer lives in a memfd */

static atomic_int live; /* buffers alive, for leak specs */

static corral_buffer *alloc_buffer(size_t len) {
  corral_buffer *b = calloc(1, sizeof *b);
  if (b == NULL) return NULL;
  atomic_init(&b->refs, 1);
  atomic_init(&b->shared, 0);
  atomic_init(&b->sealed, 0);
  atomic_init(&b->handle, 0);
  b->len = len;
  b->fd = -1;
  return b;
}

corral_buffer *corral__buffer_new(size_t len) {
  corral_buffer *b = alloc_buffer(len);
  if (b == NULL) return NULL;
  if (len >= SHM_MIN) {
    b->fd = memfd_create("corral.buffer", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (b->fd >= 0 && ftruncate(b->fd, (off_t)len) == 0) {
      void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, b->fd, 0);
      if (p != MAP_FAILED) b->data = p;
    }
    if (b->data == NULL && b->fd >= 0) {
      close(b->fd);
      b->fd = -1;
    }
  }
  if (b->data == NULL) { /* small, or no memfd here: the heap (zeroed) */
    b->data = calloc(1, len ? len : 1);
    if (b->data == NULL) {
      free(b);
      return NULL;
    }
  }
  atomic_fetch_add_explicit(&live, 1, memory_order_relaxed);
  return b;
}

corral_buffer *corral__buffer_map(int fd, size_t len) {
  corral_buffer *b = alloc_buffer(len);
  if (b == NULL) return NULL;
  struct stat st;
  void *p = MAP_FAILED;
  /* (the size is checked against the file, a peer may lie about it; and
   * the file must be sealed, or its sender could shrink it under this
   * mapping or change its bytes) */
  int need = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;
  int seals = fcntl(fd, F_GET_SEALS);
  if (len > 0 && seals >= 0 && (seals & need) == need && fstat(fd, &st) == 0 &&
      (uint64_t)st.st_size >= (uint64_t)len)
    p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    free(b);
    return NULL;
  }
  b->data = p;
  b->fd = fd;
  atomic_init(&b->shared, 1);
  atomic_init(&b->sealed, 2);
  atomic_fetch_add_explicit(&live, 1, memory_order_relaxed);
  return b;
}

int corral__buffer_seal(corral_buffer *b) {
  if (b->fd < 0) return -1;
  int s = 0;
  if (atomic_compare_exchange_strong(&b->sealed, &s, 1)) {
    /* the one mapping of ours made read-only, at the same address (a
     * pointer taken before stays valid for reading), through a read-only
     * descriptor (a mapping of a writable one counts as writable, refuses
     * F_SEAL_WRITE, and could be made writable again); then the seals */
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", b->fd);
    int ro = open(path, O_RDONLY | O_CLOEXEC);
    int ok =
        ro >= 0 && mmap(b->data, b->len, PROT_READ, MAP_SHARED | MAP_FIXED, ro, 0) != MAP_FAILED &&
        fcntl(b->fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0;
    if (ro >= 0) close(ro);
    atomic_store(&b->sealed, ok ? 2 : 3);
    return ok ? 0 : -1;
  }
  while ((s = atomic_load(&b->sealed)) == 1) /* another thread seals it */
    sched_yield();
  return s == 2 ? 0 : -1;
}

void corral__buffer_retain(corral_buffer *b) {
  atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed);
}

void corral__buffer_release(corral_buffer *b) {
  if (b == NULL || atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1) return;
  uint64_t h = atomic_load_explicit(&b->handle, memory_order_acquire);
  if (h != 0) corral__handle_free(h);
  if (b->fd >= 0) {
    munmap(b->data, b->len);
    close(b->fd);
  } else {
    free(b->data);
  }
  free(b);
  atomic_fetch_sub_explicit(&live, 1, memory_order_relaxed);
}

uint64_t corral__buffer_handle(corral_buffer *b) {
  return corral__handle_of(&b->handle, b, HANDLE_BUFFER, &b->refs);
}

int corral__buffer_live(void) { return atomic_load_explicit(&live, memory_order_relaxed); }

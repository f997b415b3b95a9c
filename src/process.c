/* process.c: process workers: an instance that runs in a child process.
 *
 * In the parent, a process worker is a worker of the core (its inbox,
 * overflow, backpressure, stop and crash are worker.c's) whose context is a
 * proxy loop on a thread of this process: it takes calls from the inbox,
 * sends them to the child as frames once their inputs have settled, and
 * settles their futures with the results the child sends back. In the
 * child, a pump does the other half: it starts the instance as a thread
 * worker of the child's own runtime (so that it serves calls exactly as a
 * thread worker does) and moves calls and results between the socket and
 * that worker.
 *
 * Frames, both ways, on a socketpair: a 4-byte big-endian length, then a
 * type byte and the fields below (integers big-endian, bytes as a 4-byte
 * length and the bytes):
 *   BOOT   parent -> child: key k0 (8), k1 (8), inbox bound (4), slots of
 *          the ring of started calls (4: 0 for none), name, boot
 *   CALL   parent -> child: id (8), flags (1), method, arguments, inputs
 *          (4: count), each input a state (1) and its encoded result
 *   RESULT child -> parent: id (8), state (1), encoded values or error
 * Buffers in shared memory (a memfd) travel as SHM extensions in the
 * payloads, and their descriptors on a second socket (SOCK_SEQPACKET, the
 * child's descriptor 4), one per message, sent before the frame that names
 * them: a payload that holds any says so (flags bit 0 for the arguments,
 * bit 7 of an input's or a result's state), and the reader takes one
 * descriptor for each, in order, and writes it into the extension
 * (SHMFD). An SHMFD from the other side is refused: only this process
 * writes them.
 *   CANCEL parent -> child: id (8): its caller cancelled it (or its time
 *          limit passed); the child cancels it where it waits
 *   SYNC   child -> parent: id (8), handle (8), op (1), n (8), value: an
 *          operation on one of the parent's channels or sync primitives
 *          that a call gave the child (an RSYNC extension names it by its
 *          handle here; one it was not given is refused)
 *   SYNC_CANCEL child -> parent: id (8): the waiting task gave up
 *   SYNC_REPLY  parent -> child: id (8), state, its index and the object's
 *          state, value (frame.h): a SYNC done (or given up)
 * The parent waits on the child's behalf (its proxy's context holds the
 * waiter records), so a child's task waits on a parent's channel as a
 * thread worker's does. A task that gives up (a timeout, a cancel) sends
 * SYNC_CANCEL and waits for the one answer every request gets: GONE, or
 * the grant that came first (then the operation happened, as in process).
 * Which calls a child started, the parent reads after its death in a ring
 * in shared memory (a memfd, its descriptor sent before BOOT): the child
 * writes a call's id at id & mask as the call starts, before its method
 * runs; the parent hands over no more calls than the ring has slots, so a
 * slot holding the id means that call started, exactly.
 * The parent closes its end to stop the child (it drains its calls first),
 * or kills it. What a child sends is untrusted: a frame that does not parse
 * ends it with a clear error; its results decode as CODEC_PEER (functions
 * made with the shared key load; references to live objects are refused).
 *
 * A call handed to the child is RUNNING here: the proxy hands over as many
 * as the child has runners (max_concurrency) and PIPELINE more, so that the
 * child never waits for the next call; the calls beyond stay in the inbox.
 * A call handed over can still be cancelled (FUTURE_HARD): its future is
 * cancelled at once, the child is sent CANCEL, and when no RESULT has come
 * for it within the worker's cancel_grace, the process is killed and
 * replaced (a runaway loop runs no hook and reaches no wait).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <errno.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "frame.h"
#include "internal.h"

enum { WIRE_NONE = 0, WIRE_WAITING = 1, WIRE_SENT = 2 };
#define PIPELINE 16 /* calls handed to a child beyond its free runners */

static char *dup_bytes(const char *s, size_t n) {
  char *d = malloc(n ? n : 1);
  if (d != NULL && n > 0) memcpy(d, s, n);
  return d;
}

/* ======================================================================== */
/* Descriptors of shared buffers                                             */
/* ======================================================================== */

#define FDS_PER_MESSAGE 253 /* SCM_MAX_FD */

/* Send n descriptors on ch, up to FDS_PER_MESSAGE a message; never
 * blocks (a full socket is a failure: the caller ends the child). */
static int send_fds(int ch, const int *fds, int n) {
  for (int off = 0; off < n; off += FDS_PER_MESSAGE) {
    int k = n - off < FDS_PER_MESSAGE ? n - off : FDS_PER_MESSAGE;
    char byte = 0;
    struct iovec iov = {&byte, 1};
    union {
      struct cmsghdr h;
      char buf[CMSG_SPACE(sizeof(int) * FDS_PER_MESSAGE)];
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)k);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)k);
    memcpy(CMSG_DATA(cm), fds + off, sizeof(int) * (size_t)k);
    ssize_t r;
    do
      r = sendmsg(ch, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (r < 0 && errno == EINTR);
    if (r != 1) return -1;
  }
  return 0;
}

static int send_fd(int ch, int fd) { return send_fds(ch, &fd, 1); }

/* Descriptors received and not taken yet, in order. */
typedef struct {
  int *fds;
  int head, n, cap;
} fdq;

#define FD_LOST (-2) /* a descriptor sent that this process could not take */

/* Queue fd (or FD_LOST) at the end of q: 0, or -1 with *bad set (fd is
 * closed: once the queue could not grow, every descriptor that follows in
 * the message is closed too). */
static int fdq_push(fdq *q, int fd, int *bad) {
  if (!*bad && q->head + q->n == q->cap) {
    if (q->head > 0) {
      memmove(q->fds, q->fds + q->head, sizeof(int) * (size_t)q->n);
      q->head = 0;
    } else {
      int cap = q->cap ? q->cap * 2 : 16;
      int *fds = realloc(q->fds, sizeof(int) * (size_t)cap);
      if (fds == NULL)
        *bad = 1;
      else {
        q->fds = fds;
        q->cap = cap;
      }
    }
  }
  if (*bad) {
    if (fd >= 0) close(fd);
    return -1;
  }
  q->fds[q->head + q->n++] = fd;
  return 0;
}

/* Receive the next message of descriptors into q (they were sent before
 * the frame that names them: there, or the peer lied): how many, or -1.
 * `expect`: how many the message should carry (send_fds' packing). The
 * kernel truncates the control data (MSG_CTRUNC) only when this process
 * cannot take the descriptors (at its limit of open descriptors: the
 * buffer holds the most one message can carry, SCM_MAX_FD), so those
 * missing are queued as FD_LOST: the message is consumed, and the reader
 * stays in step with the sender. */
static int fdq_fill(int ch, fdq *q, int expect) {
  char byte;
  struct iovec iov = {&byte, 1};
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(sizeof(int) * FDS_PER_MESSAGE)];
  } u;
  struct msghdr m;
  memset(&m, 0, sizeof m);
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = u.buf;
  m.msg_controllen = sizeof u.buf;
  ssize_t k;
  do
    k = recvmsg(ch, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (k < 0 && errno == EINTR);
  if (k != 1) return -1;
  int got = 0, bad = 0, trunc = (m.msg_flags & MSG_CTRUNC) != 0;
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm != NULL; cm = CMSG_NXTHDR(&m, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    int n = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < n; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(cm) + sizeof(int) * (size_t)i, sizeof fd);
      if (fdq_push(q, fd, &bad) == 0) got++;
    }
  }
  /* (those the kernel could not give this process are gone: as many as
   * the message should have carried are marked lost) */
  for (int i = got; trunc && !bad && i < expect; i++)
    if (fdq_push(q, FD_LOST, &bad) == 0) got++;
  return bad ? -1 : got;
}

static int fdq_take(int ch, fdq *q, int expect) {
  if (q->n == 0 && fdq_fill(ch, q, expect) <= 0) return -1;
  q->n--;
  return q->fds[q->head++];
}

/* What is left goes (the child went, or the stream is out of step). */
static void fdq_clear(fdq *q) {
  for (int i = 0; i < q->n; i++)
    if (q->fds[q->head + i] >= 0) close(q->fds[q->head + i]);
  q->head = q->n = 0;
}

static uint64_t be64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v = v << 8 | p[i];
  return v;
}

/* Sending a payload's SHM extensions: the descriptor of each (the payload
 * keeps each open meanwhile). */
typedef struct {
  int *fds;
  int n, cap;
} shm_out;

static int send_shm(void *ud, unsigned char *body, int type) {
  shm_out *s = ud;
  int fd;
  if (type == CODEC_SHM_FD) { /* (a result of another process worker, forwarded) */
    uint64_t v = be64(body);
    if (v > INT32_MAX) return 2;
    fd = (int)v;
  } else {
    corral_buffer *b = corral__handle_get(be64(body), HANDLE_BUFFER);
    if (b == NULL) return 2;
    fd = b->fd;
    corral__buffer_release(b); /* (the payload holds it) */
  }
  if (s->n == s->cap) {
    int cap = s->cap ? s->cap * 2 : 16;
    int *fds = realloc(s->fds, sizeof(int) * (size_t)cap);
    if (fds == NULL) return 2;
    s->fds = fds;
    s->cap = cap;
  }
  s->fds[s->n++] = fd;
  return 0;
}

/* Send the descriptors of the SHM extensions in p: how many (0 for none),
 * -1 when p's buffers could not be read, or -2 when the socket failed (the
 * child is gone, or the socket is full). */
static int send_shms(int ch, const char *p, size_t n) {
  shm_out s = {NULL, 0, 0};
  int rc = corral__codec_shm_each((char *)p, n, send_shm, &s) == 0 ? 0 : -1;
  if (rc == 0 && s.n > 0 && send_fds(ch, s.fds, s.n) != 0) rc = -2;
  free(s.fds);
  return rc == 0 ? s.n : rc;
}

/* Receiving: each SHM extension gets the next descriptor (kept in fds, to
 * close on failure) and becomes an SHMFD. `from_peer`: an SHMFD is refused
 * (only this process writes them). `total`: how many the payload names (the
 * sender packed them FDS_PER_MESSAGE a message); `lost`: how many this
 * process could not take (FD_LOST). */
typedef struct {
  int ch, from_peer, n, cap, total, lost;
  int *fds;
  fdq *q;
} shm_in;

static int count_shm(void *ud, unsigned char *body, int type) {
  (void)body;
  (void)type;
  ((shm_in *)ud)->total++;
  return 0;
}

static int take_shm(void *ud, unsigned char *body, int type) {
  shm_in *s = ud;
  if (type == CODEC_SHM_FD && s->from_peer) return 1;
  if (s->n == s->cap) {
    int cap = s->cap ? s->cap * 2 : 8;
    int *fds = realloc(s->fds, sizeof(int) * (size_t)cap);
    if (fds == NULL) return 2;
    s->fds = fds;
    s->cap = cap;
  }
  int left = s->total - s->n;
  int fd = fdq_take(s->ch, s->q, left < FDS_PER_MESSAGE ? left : FDS_PER_MESSAGE);
  if (fd == FD_LOST) { /* (the walk goes on: every descriptor sent is taken) */
    s->fds[s->n++] = fd;
    s->lost++;
    return 0;
  }
  if (fd < 0) return 3;
  s->fds[s->n++] = fd;
  for (int i = 0; i < 8; i++)
    body[i] = (unsigned char)((uint64_t)fd >> (56 - 8 * i));
  body[-1] = (unsigned char)CODEC_SHM_FD;
  return 0;
}

/* Rewrite the SHM extensions of p (a copy this process owns) with the
 * descriptors that came on ch. 0; or -1 (they did not come, or the payload
 * is bad); or, when they came but this process could not take them all (its
 * limit of open descriptors), how many it could not take, *total of them:
 * the stream of descriptors is still in step. On failure the descriptors
 * taken are closed. */
static int take_shms(int ch, fdq *q, char *p, size_t n, int from_peer, int *total) {
  shm_in s = {ch, from_peer, 0, 0, 0, 0, NULL, q};
  int rc = corral__codec_shm_each(p, n, count_shm, &s);
  if (rc == 0) rc = corral__codec_shm_each(p, n, take_shm, &s);
  if (rc != 0 || s.lost > 0)
    for (int i = 0; i < s.n; i++)
      if (s.fds[i] >= 0) close(s.fds[i]);
  free(s.fds);
  if (total != NULL) *total = s.total;
  return rc != 0 ? -1 : s.lost;
}

/* Why a payload's buffers could not be received: `lost` of the `total`
 * descriptors its buffers in shared memory need could not be taken here. */
static void limit_message(char *msg, size_t cap, const char *what, int total, int lost) {
  struct rlimit rl;
  char lim[32] = "unlimited";
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
    snprintf(lim, sizeof lim, "%llu", (unsigned long long)rl.rlim_cur);
  snprintf(msg, cap,
           "%s %d buffers in shared memory, and %d of their descriptors could not be"
           " received: the %s is at its limit of open descriptors (ulimit -n: %s)",
           what, total, lost, strcmp(what, "its result holds") == 0 ? "caller" : "worker's process",
           lim);
}

/* ======================================================================== */
/* Writing on a stream                                                       */
/* ======================================================================== */

typedef struct {
  uv_write_t req;
  char *p;
} wreq;

static void on_written(uv_write_t *req, int status) {
  (void)status; /* a broken pipe shows up as the child's exit */
  wreq *r = (wreq *)req;
  free(r->p);
  free(r);
}

/* Send the frame in b (taken). 0, or -1 when it could not be queued. */
static int send_frame(uv_stream_t *s, wbuf *b) {
  if (b->failed || b->len - 4 > FRAME_MAX) {
    free(b->p);
    return -1;
  }
  corral__frame_end(b);
  wreq *r = malloc(sizeof *r);
  if (r == NULL) {
    free(b->p);
    return -1;
  }
  r->p = b->p;
  uv_buf_t buf = uv_buf_init(b->p, (unsigned)b->len);
  if (uv_write(&r->req, s, &buf, 1, on_written) != 0) {
    free(r->p);
    free(r);
    return -1;
  }
  return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  static _Thread_local char chunk[65536];
  *buf = uv_buf_init(chunk, sizeof chunk);
}

/* ======================================================================== */
/* The parent's proxy                                                        */
/* ======================================================================== */

/* How the child program is started (set by the binding, see
 * corral__process_program). */
static char *program[8];

/* A child's stdout or stderr, when this process's is not a terminal: read
 * here and written out a whole line at a time, prefixed with the worker's
 * name, so that the lines of several workers never mix and say whose they
 * are. (On a terminal the child writes to it directly.) */
typedef struct {
  uv_pipe_t pipe;
  struct proxy *p;
  int fd; /* this process's: 1 or 2 */
  int open;
  rbuf line; /* a line not ended yet */
} outlet;

typedef struct proxy {
  corral_worker *w;
  uv_loop_t *loop;
  uv_process_t proc;
  outlet out[2]; /* its stdout and stderr, when they are read here */
  uv_pipe_t sock;
  int fdch; /* the socket for descriptors of shared buffers (ours), or -1 */
  fdq fds;  /* descriptors it sent, not taken yet */
  rbuf in;
  int spawned, exited, eof, killed, shut, handles;
  int restarts;    /* children started after the first died */
  int in_row;      /* restarts since a call was last answered (the back-off doubles) */
  int dying;       /* its instance died: the process is ending, nothing more is sent */
  char died[300];  /* why, as its child said (a WorkerCrashed's message), or "" */
  unsigned events; /* reads from the socket */
  int64_t status;
  int signal;
  uint64_t next_id;
  int inflight, window;
  uv_timer_t grace;        /* the next end of a cancelled call's grace */
  _Atomic(uint64_t) *ring; /* the calls the child started (see the top), or NULL */
  uint64_t ring_n;
  int ring_fd;
  int cancel_kill; /* the child was killed to stop a cancelled call */
  char why[200];   /* set when the child sent what does not parse */
  /* the sync objects calls gave the child (retained), and the child's SYNC
   * requests that wait here (id -> waiter record of this context) */
  corral_sync **caps;
  int ncaps, capcaps;
  struct psync {
    uint64_t id;
    corral_sync_waiter *rec;
  } * psync;
  int npsync, cappsync;
} proxy;

static void kill_child(proxy *p) {
  if (p->spawned && !p->exited && !p->killed) {
    p->killed = 1;
    uv_process_kill(&p->proc, SIGKILL);
  }
}

/* The socket of descriptors goes with its child (what is still in it is
 * closed by the kernel). */
static void close_fdch(proxy *p) {
  if (p->fdch >= 0) close(p->fdch);
  p->fdch = -1;
  fdq_clear(&p->fds);
}

/* The child broke the protocol: it ends, and the worker with this error. */
static void bad_child(proxy *p, const char *why) {
  if (p->why[0] == '\0') snprintf(p->why, sizeof p->why, "%s", why);
  kill_child(p);
}

/* The call is done here: counted, out of `taken`, freed. */
static void call_done(corral_worker *w, corral_call *c) {
  atomic_fetch_sub(&w->active, 1);
  queue_remove(&c->node);
  corral__call_free(c);
}

static corral_call *sent_call(corral_worker *w, uint64_t id) {
  for (queue *q = queue_head(&w->taken); q != &w->taken; q = q->next) {
    corral_call *c = queue_data(q, corral_call, node);
    if (c->wire_state == WIRE_SENT && c->wire_id == id) return c;
  }
  return NULL;
}

/* ======================================================================== */
/* A child's operations on the parent's sync objects                         */
/* ======================================================================== */

/* A sync object a call gives the child: kept (retained) while the proxy
 * lives, the handle it is known by there. Takes the caller's reference. */
static int keep_sync(void *ud, corral_sync *s) {
  proxy *p = ud;
  for (int i = 0; i < p->ncaps; i++)
    if (p->caps[i] == s) {
      corral__sync_release(s);
      return 0;
    }
  if (p->ncaps == p->capcaps) {
    int cap = p->capcaps ? p->capcaps * 2 : 8;
    corral_sync **c = realloc(p->caps, sizeof(corral_sync *) * (size_t)cap);
    if (c == NULL) {
      corral__sync_release(s);
      return -1;
    }
    p->caps = c;
    p->capcaps = cap;
  }
  p->caps[p->ncaps++] = s;
  return 0;
}

static corral_sync *cap_of(proxy *p, uint64_t h) {
  for (int i = 0; i < p->ncaps; i++)
    if (atomic_load(&p->caps[i]->handle) == h) return p->caps[i];
  return NULL;
}

/* Which operations each kind takes from a child. */
static int op_fits(int kind, int op) {
  switch (op) {
  case SYNC_OP_PUT:
  case SYNC_OP_GET:
  case SYNC_OP_TRY_PUT:
  case SYNC_OP_TRY_GET: return kind == SYNC_CHANNEL || kind == SYNC_QUEUE;
  case SYNC_OP_CLOSE: return kind == SYNC_CHANNEL || kind == SYNC_BARRIER;
  case SYNC_OP_JOIN:
  case SYNC_OP_TASK_DONE: return kind == SYNC_QUEUE;
  case SYNC_OP_ACQUIRE:
  case SYNC_OP_RELEASE: return kind == SYNC_LOCK || kind == SYNC_SEMAPHORE;
  case SYNC_OP_EVENT:
  case SYNC_OP_SET: return kind == SYNC_EVENT;
  case SYNC_OP_NOTIFY:
  case SYNC_OP_NOTIFY_N: return kind == SYNC_CONDITION;
  case SYNC_OP_BARRIER:
  case SYNC_OP_RESET: return kind == SYNC_BARRIER;
  case SYNC_OP_INFO: return 1;
  default: return 0;
  }
}

/* A frame's value as a channel's item (the child's bytes decode as a
 * peer's): 0, or -1 when malformed (or no memory). */
static int item_of(const frame_value *v, sync_item *it) {
  memset(it, 0, sizeof *it);
  switch (v->tag) {
  case FV_NONE: return 0;
  case FV_FALSE: it->tag = SYNC_ITEM_FALSE; return 0;
  case FV_TRUE: it->tag = SYNC_ITEM_TRUE; return 0;
  case FV_NUMBER:
    it->tag = SYNC_ITEM_NUMBER;
    it->num = v->num;
    return 0;
  case FV_STRING:
    if (v->n > SYNC_SMALL) return -1;
    memcpy(it->small, v->bytes, v->n);
    it->slen = (unsigned char)v->n;
    it->tag = SYNC_ITEM_STRING;
    return 0;
  case FV_ENCODED:
    if (v->n == 0) return -1;
    it->p = dup_bytes(v->bytes, v->n);
    if (it->p == NULL) return -1;
    it->len = v->n;
    it->trust = CODEC_PEER;
    return 0;
  default: return -1;
  }
}

static void free_item(sync_item *it) {
  if (it->p != NULL) corral__codec_free(it->p, it->len, it->discard != NULL);
  memset(it, 0, sizeof *it);
}

/* An item as a frame's value (it must hold no reference: 0, else -1). */
static int value_of(const sync_item *it, frame_value *v) {
  memset(v, 0, sizeof *v);
  if (it == NULL) return 0;
  if (it->p != NULL) {
    if (it->discard != NULL) return -1;
    v->tag = FV_ENCODED;
    v->bytes = it->p;
    v->n = it->len;
    return 0;
  }
  switch (it->tag) {
  case SYNC_ITEM_FALSE: v->tag = FV_FALSE; break;
  case SYNC_ITEM_TRUE: v->tag = FV_TRUE; break;
  case SYNC_ITEM_NUMBER:
    v->tag = FV_NUMBER;
    v->num = it->num;
    break;
  case SYNC_ITEM_STRING:
    v->tag = FV_STRING;
    v->bytes = it->small;
    v->n = it->slen;
    break;
  default: break;
  }
  return 0;
}

/* Answer the child's request `id` with `state` (and a got value: one that
 * holds references cannot go to the child: it goes back to the channel's
 * head, and the child's get fails). */
static void sync_reply(proxy *p, uint64_t id, int state, long ival, sync_item *v, corral_sync *s) {
  frame_value fv;
  if (value_of(v, &fv) != 0) {
    corral__sync_putback(s, v);
    memset(&fv, 0, sizeof fv);
    state = SYNC_UNREADABLE;
  }
  sync_info in;
  corral__sync_state(s, &in);
  wbuf b = {0};
  corral__frame_begin(&b, F_SYNC_REPLY);
  corral__w_uint(&b, id, 8);
  corral__w_uint(&b, (uint64_t)state, 1);
  corral__w_uint(&b, (uint64_t)(int64_t)ival, 8);
  corral__w_uint(&b, (uint64_t)(int64_t)in.count, 8);
  corral__w_uint(&b, (uint64_t)(in.closed != 0), 1);
  corral__w_uint(&b, (uint64_t)(int64_t)in.unfinished, 8);
  corral__w_uint(&b, (uint64_t)(int64_t)in.waiting, 8);
  corral__w_uint(&b, (uint64_t)(int64_t)in.putting, 8);
  corral__w_uint(&b, (uint64_t)(int64_t)in.cap, 8);
  corral__w_value(&b, &fv);
  if (v != NULL) free_item(v);
  if (send_frame((uv_stream_t *)&p->sock, &b) != 0) kill_child(p); /* (out of memory) */
}

static const char *on_sync(proxy *p, rcur *c) {
  frame_sync fs;
  const char *bad = corral__frame_sync(c, &fs);
  if (bad != NULL) return bad;
  corral_sync *s = cap_of(p, fs.handle);
  if (s == NULL) return "a SYNC frame for an object it was not given";
  if (!op_fits(s->kind, fs.op)) return "a SYNC frame with an operation its object does not have";
  if (fs.n < 0 || fs.n > (int64_t)1 << 31) return "a SYNC frame with a bad count";
  long n = (long)fs.n;
  /* (an acquire takes one permit; a lock gives back one) */
  if ((fs.op == SYNC_OP_ACQUIRE || (fs.op == SYNC_OP_RELEASE && s->kind == SYNC_LOCK)) && n != 1)
    return "a SYNC frame with a bad count";
  if ((fs.op == SYNC_OP_RELEASE && n < 1) || (fs.op == SYNC_OP_SET && n > 1))
    return "a SYNC frame with a bad count";
  sync_case cs;
  memset(&cs, 0, sizeof cs);
  if (item_of(&fs.v, &cs.val) != 0) return "a SYNC frame with a malformed value";
  int put = fs.op == SYNC_OP_PUT || fs.op == SYNC_OP_TRY_PUT;
  if (put != (cs.val.p != NULL || cs.val.tag != SYNC_ITEM_NONE)) {
    free_item(&cs.val);
    return "a SYNC frame whose value does not fit its operation";
  }
  int rc = SYNC_GRANTED, which;
  long ival = 0;
  corral_sync_waiter *rec = NULL;
  switch (fs.op) {
  case SYNC_OP_TRY_PUT:
  case SYNC_OP_TRY_GET:
  case SYNC_OP_PUT:
  case SYNC_OP_GET:
  case SYNC_OP_ACQUIRE:
  case SYNC_OP_EVENT:
  case SYNC_OP_NOTIFY:
  case SYNC_OP_BARRIER:
  case SYNC_OP_JOIN: {
    int wait = fs.op < SYNC_OP_TRY_PUT;
    cs.s = s;
    cs.op = fs.op == SYNC_OP_TRY_PUT ? SYNC_OP_PUT : fs.op == SYNC_OP_TRY_GET ? SYNC_OP_GET : fs.op;
    cs.n = n < 1 ? 1 : n;
    rc = corral__sync_select(&cs, 1, wait, &p->w->ctx, NULL, &which, &rec);
    if (rc == SYNC_NOMEM) {
      free_item(&cs.val);
      return "out of memory";
    }
    if (rc == SYNC_QUEUED && wait) {
      if (p->npsync == p->cappsync) {
        int cap = p->cappsync ? p->cappsync * 2 : 16;
        struct psync *ps = realloc(p->psync, sizeof *ps * (size_t)cap);
        if (ps == NULL) {
          corral__sync_finish(rec, 1, NULL, NULL, NULL, NULL);
          return "out of memory";
        }
        p->psync = ps;
        p->cappsync = cap;
      }
      p->psync[p->npsync].id = fs.id;
      p->psync[p->npsync].rec = rec;
      p->npsync++;
      return NULL;
    }
    ival = cs.ival;
    if (cs.op == SYNC_OP_GET && rc == SYNC_GRANTED) {
      sync_reply(p, fs.id, rc, ival, &cs.val, s);
      return NULL;
    }
    free_item(&cs.val); /* (a put that did not happen) */
    break;
  }
  case SYNC_OP_CLOSE: rc = corral__sync_close(s, NULL) ? SYNC_GRANTED : SYNC_GONE; break;
  case SYNC_OP_RELEASE:
    rc = corral__sync_release_permits(s, n < 1 ? 1 : n, NULL) == 0 ? SYNC_GRANTED : SYNC_GONE;
    break;
  case SYNC_OP_SET: corral__sync_set(s, n != 0, NULL); break;
  case SYNC_OP_NOTIFY_N: ival = corral__sync_notify(s, n, NULL); break;
  case SYNC_OP_TASK_DONE:
    rc = corral__sync_task_done(s, NULL) == 0 ? SYNC_GRANTED : SYNC_GONE;
    break;
  case SYNC_OP_RESET: corral__sync_reset(s, NULL); break;
  case SYNC_OP_INFO: break;
  }
  sync_reply(p, fs.id, rc, ival, NULL, s);
  return NULL;
}

/* A request of the child that waited here was granted: answered. */
static void on_sync_post(void *ud, corral_post *post) {
  proxy *p = ud;
  corral_sync_waiter *rec = (corral_sync_waiter *)post;
  for (int i = 0; i < p->npsync; i++) {
    if (p->psync[i].rec != rec) continue;
    uint64_t id = p->psync[i].id;
    p->psync[i] = p->psync[--p->npsync];
    corral_sync *s = rec->s;
    corral__sync_retain(s);
    int op = rec->op;
    sync_item it;
    memset(&it, 0, sizeof it);
    long ival = 0;
    int st = corral__sync_finish(rec, 0, &it, &ival, NULL, NULL);
    sync_reply(p, id, st, ival, op == SYNC_OP_GET ? &it : NULL, s);
    free_item(&it);
    corral__sync_release(s);
    return;
  }
}

static const char *on_sync_cancel(proxy *p, rcur *c) {
  uint64_t id;
  const char *bad = corral__frame_cancel(c, &id);
  if (bad != NULL) return bad;
  for (int i = 0; i < p->npsync; i++) {
    if (p->psync[i].id != id) continue;
    corral_sync_waiter *rec = p->psync[i].rec;
    p->psync[i] = p->psync[--p->npsync];
    corral_sync *s = rec->s;
    corral__sync_retain(s);
    /* a grant not posted here yet stands, unless it can be given back (a
     * value to the channel's head, a permit): the answer says which */
    int undoable = rec->op == SYNC_OP_GET || rec->op == SYNC_OP_ACQUIRE;
    long ival = 0;
    int st = corral__sync_finish(rec, undoable, NULL, &ival, NULL, NULL);
    if (undoable && st == SYNC_GRANTED) st = SYNC_GONE;
    sync_reply(p, id, st, ival, NULL, s);
    corral__sync_release(s);
    break;
  }
  return NULL;
}

/* The child is gone: what it waited for here is withdrawn. */
static void drop_syncs(proxy *p) {
  while (p->npsync > 0) {
    corral_sync_waiter *rec = p->psync[--p->npsync].rec;
    corral__sync_finish(rec, 1, NULL, NULL, NULL, NULL);
  }
}

static const char *on_result(void *ud, rcur *c) {
  proxy *p = ud;
  int type = (int)corral__r_uint(c, 1);
  if (type == F_SYNC) return on_sync(p, c);
  if (type == F_SYNC_CANCEL) return on_sync_cancel(p, c);
  if (type != F_RESULT) return "a frame of an unknown type";
  frame_result fr;
  const char *bad = corral__frame_result(c, &fr);
  if (bad != NULL) return bad;
  uint64_t id = fr.id;
  int state = fr.state, shm = fr.shm;
  size_t n = fr.len;
  const char *s = fr.payload;
  corral_call *call = sent_call(p->w, id);
  if (call == NULL) return "a RESULT frame for no call it was given";
  if (state == CORRAL_PENDING) { /* it never ran there: the next process gets it */
    /* (the payload, if any, says why its instance died: kept, as text) */
    if (n > 0 && !corral__codec_error_message(s, n, p->died, sizeof p->died))
      return "a RESULT frame with a bad state";
    call->wire_state = WIRE_WAITING;
    call->unsent = 1;
    p->inflight--;
    p->dying = 1; /* (its instance died: it is given nothing more) */
    return NULL;
  }
  char *payload = n > 0 ? dup_bytes(s, n) : NULL;
  if (n > 0 && payload == NULL) {
    corral_future_set_error(call->result, "WorkerCrashed", "out of memory for a result");
  } else if (shm) {
    int total = 0, lost = take_shms(p->fdch, &p->fds, payload, n, 1, &total);
    if (lost < 0) {
      free(payload);
      return "a RESULT frame whose shared buffers did not come (or were forged)";
    }
    if (lost > 0) { /* a limit of this process, not the child's fault: it serves on */
      free(payload);
      char msg[256];
      limit_message(msg, sizeof msg, "its result holds", total, lost);
      corral__future_set_error(call->result, "CodecError", msg);
    } else {
      corral__future_settle_peer_shm(call->result, state, payload, n, corral__codec_discard);
    }
  } else {
    corral__future_settle_peer(call->result, state, payload, n);
  }
  p->inflight--;
  p->in_row = 0; /* it serves: the next restart waits the first back-off again */
  call_done(p->w, call);
  return NULL;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  proxy *p = s->data;
  if (nread < 0) {
    p->eof = 1; /* the child's end closed: its exit tells the rest */
    uv_read_stop(s);
    return;
  }
  if (nread == 0) return;
  p->events++;
  if (p->why[0] != '\0') return; /* judged bad: nothing more it sends is read */
  if (corral__rbuf_add(&p->in, buf->base, (size_t)nread) != 0) {
    bad_child(p, "out of memory reading its frames");
    return;
  }
  const char *why = corral__rbuf_frames(&p->in, on_result, p);
  if (why != NULL) bad_child(p, why);
}

static void on_child_exit(uv_process_t *proc, int64_t status, int sig) {
  proxy *p = proc->data;
  p->exited = 1;
  p->status = status;
  p->signal = sig;
}

static void on_closed(uv_handle_t *h) {
  proxy *p = h->data;
  p->handles--;
}

static void write_all(int fd, const char *s, size_t n) {
  while (n > 0) {
    ssize_t k = write(fd, s, n);
    if (k <= 0) return;
    s += k;
    n -= (size_t)k;
  }
}

/* Write the whole lines of o (all of it with `all`), each prefixed. */
static void outlet_lines(outlet *o, int all) {
  const char *name = o->p->w->name;
  size_t nlen = strlen(name), off = 0;
  while (off < o->line.len) {
    char *nl = memchr(o->line.p + off, '\n', o->line.len - off);
    if (nl == NULL && !all) break;
    size_t n = nl ? (size_t)(nl - (o->line.p + off)) : o->line.len - off;
    char stackbuf[1024];
    size_t total = nlen + 3 + n + 1;
    char *b = total <= sizeof stackbuf ? stackbuf : malloc(total);
    if (b != NULL) {
      b[0] = '[';
      // NOLINTNEXTLINE(bugprone-not-null-terminated-result): bytes to write(), not a string
      memcpy(b + 1, name, nlen);
      b[nlen + 1] = ']';
      b[nlen + 2] = ' ';
      memcpy(b + nlen + 3, o->line.p + off, n);
      b[total - 1] = '\n';
      write_all(o->fd, b, total); /* one write: whole lines never mix */
      if (b != stackbuf) free(b);
    }
    off += n + (nl ? 1 : 0);
  }
  if (off > 0) memmove(o->line.p, o->line.p + off, o->line.len - off);
  o->line.len -= off;
}

static void on_outlet_closed(uv_handle_t *h) {
  outlet *o = h->data;
  o->p->handles--;
}

static void outlet_close(outlet *o) {
  if (!o->open) return;
  o->open = 0;
  outlet_lines(o, 1);
  uv_close((uv_handle_t *)&o->pipe, on_outlet_closed);
}

static void on_output(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  outlet *o = s->data;
  if (nread < 0) {
    outlet_close(o);
    return;
  }
  o->p->events++;
  if (nread > 0 && corral__rbuf_add(&o->line, buf->base, (size_t)nread) == 0) outlet_lines(o, 0);
}

/* Every input of c has settled (watching those that have not). */
static int inputs_ready(proxy *p, corral_call *c) {
  int ready = 1;
  for (int i = 0; i < c->ndeps; i++) {
    if (corral_future_state(c->deps[i]) >= CORRAL_DONE) continue;
    /* the loop hears when it settles (a watch made once: WIRE_WAITING
     * calls are watched on their first look); one that settled since the
     * look above makes no watch, and is ready */
    if (c->wire_id == 0 && corral__future_watch(c->deps[i], &p->w->ctx, corral__ctx_post) == 1)
      continue;
    ready = 0;
  }
  return ready;
}

/* Hand c to the child: 0, -1 when it failed (its future says why), or 1
 * when the child is going (the call waits for the next one, unstarted). */
static int send_call(proxy *p, corral_call *c) {
  corral__trace_wire(c->result, (long)p->proc.pid, c->wire_id); /* (a trace's arrow to the child) */
  wbuf b = {0};
  /* the descriptors of its buffers in shared memory go first */
  int shm = c->payload_refs ? send_shms(p->fdch, c->payload, c->len) : 0;
  int sent = shm > 0 ? shm : 0;
  corral__frame_begin(&b, F_CALL);
  corral__w_uint(&b, c->wire_id, 8);
  corral__w_uint(&b, shm > 0, 1);
  corral__w_bytes(&b, c->method, c->mlen);
  /* its channels and sync primitives: named by handle, kept here */
  size_t rn = 0;
  int rfail = 0;
  char *rs = c->payload_refs
                 ? corral__codec_syncs_for_child(c->payload, c->len, &rn, keep_sync, p, &rfail)
                 : NULL;
  if (rfail) shm = -3;
  corral__w_bytes(&b, rs != NULL ? rs : c->payload, rs != NULL ? rn : c->len);
  free(rs);
  corral__w_uint(&b, (uint64_t)c->ndeps, 4);
  for (int i = 0; i < c->ndeps && shm >= 0; i++) {
    const void *mp = NULL;
    size_t n = 0;
    corral_future *d = c->deps[i];
    corral_future_payload(d, &mp, &n);
    /* an input made in this process may hold buffers by handle: a copy
     * with them fit for the child */
    char *fit = NULL;
    size_t fitn = 0;
    if (corral__future_trust(d) == CODEC_TRUSTED && d->discard != NULL) {
      int failed;
      fit = corral__codec_for_process(mp, n, &fitn, &failed);
      if (failed) shm = -1;
      if (fit != NULL) {
        mp = fit;
        n = fitn;
      }
    }
    int dshm = shm < 0                                                ? -1
               : fit != NULL || (corral__future_trust(d) & CODEC_SHM) ? send_shms(p->fdch, mp, n)
                                                                      : 0;
    if (dshm < 0) shm = dshm;
    if (dshm > 0) sent += dshm;
    corral__w_uint(&b, (uint64_t)corral_future_state(d) | (dshm > 0 ? FRAME_SHM : 0), 1);
    char *rsd = NULL;
    size_t rsn = 0;
    if (shm >= 0 && d->discard != NULL && corral__future_trust(d) == CODEC_TRUSTED) {
      rsd = corral__codec_syncs_for_child(mp, n, &rsn, keep_sync, p, &rfail);
      if (rfail) shm = -3;
    }
    corral__w_bytes(&b, rsd != NULL ? rsd : mp, rsd != NULL ? rsn : n);
    free(rsd);
    if (fit != NULL) {
      corral__codec_discard(fit, fitn);
      free(fit);
    }
  }
  int too_big = shm >= 0 && (b.failed || b.len - 4 > FRAME_MAX);
  if (shm == -2 || (shm >= 0 && !too_big && send_frame((uv_stream_t *)&p->sock, &b) != 0)) {
    /* the socket failed (its descriptors', or the frames' one: a write to
     * a process that has just died): the child is dying (or stuck): it
     * ends, and the call, not started there, goes to the next one (a
     * restart) or fails with the crash, as the calls queued behind it */
    if (shm == -2) free(b.p); /* (send_frame frees what it could not send) */
    kill_child(p);
    p->dying = 1;
    if (c->tries == 0 && !c->unsent) corral__future_watch(c->result, &p->w->ctx, corral__ctx_post);
    c->unsent = 1; /* (RUNNING already: sent again as new) */
    return 1;
  }
  if (shm < 0 || too_big) {
    free(b.p);
    /* descriptors it will not take are in its socket: the two are out of
     * step, and the child ends (its calls go as in a crash) */
    if (sent > 0 || (shm < 0 && shm != -3)) kill_child(p);
    corral_future_set_error(c->result, "CodecError",
                            shm == -3  ? "a channel or sync primitive could not be given to a "
                                         "process worker (it is gone, or one of a parent's)"
                            : shm < 0  ? "a buffer in shared memory could not be sent to a process "
                                         "worker (it is gone from this process)"
                            : b.failed ? "out of memory sending a call to a process worker"
                                       : "a call's arguments and inputs over 1 GiB cannot go to a "
                                         "process worker");
    call_done(p->w, c);
    return -1;
  }
  c->wire_state = WIRE_SENT;
  c->cancel_at = 0;
  p->inflight++;
  /* this loop hears of a cancel (settled already: seen next turn) */
  if (c->tries == 0 && !c->unsent) corral__future_watch(c->result, &p->w->ctx, corral__ctx_post);
  return 0;
}

/* ======================================================================== */
/* Cancelling calls handed over                                              */
/* ======================================================================== */

/* The earliest end of a grace still running, or 0. */
static uint64_t next_grace(proxy *p) {
  uint64_t first = 0;
  for (queue *q = queue_head(&p->w->taken); q != &p->w->taken; q = q->next) {
    corral_call *c = queue_data(q, corral_call, node);
    if (c->wire_state == WIRE_SENT && c->cancel_at != 0 && (first == 0 || c->cancel_at < first))
      first = c->cancel_at;
  }
  return first;
}

static void on_grace(uv_timer_t *t);

static void arm_grace(proxy *p) {
  uint64_t first = next_grace(p), now = uv_hrtime();
  if (first == 0) {
    uv_timer_stop(&p->grace);
    return;
  }
  uv_timer_start(&p->grace, on_grace, first > now ? (first - now + 999999) / 1000000 : 0, 0);
}

/* A cancelled call's grace ended and no RESULT came for it: it does not
 * stop by itself (it runs no wait), so its process is ended; the restart
 * replaces it (see restart). */
static void on_grace(uv_timer_t *t) {
  proxy *p = t->data;
  uint64_t first = next_grace(p);
  if (first == 0) return;
  if (first > uv_hrtime()) {
    arm_grace(p);
    return;
  }
  p->cancel_kill = 1;
  kill_child(p);
}

/* Calls handed over whose future settled here (a cancel, a time limit):
 * the child is told, and their grace starts. */
static void cancel_calls(proxy *p) {
  corral_worker *w = p->w;
  int sent = 0;
  /* the last first: a call that has not started there is cancelled before
   * a cancel ahead of it frees a runner that would start it */
  for (queue *q = w->taken.prev; q != &w->taken; q = q->prev) {
    corral_call *c = queue_data(q, corral_call, node);
    if (c->wire_state != WIRE_SENT || c->cancel_at != 0) continue;
    if (corral_future_state(c->result) < CORRAL_DONE) continue;
    uv_mutex_lock(&w->ctx.qlock);
    uint64_t grace = w->cancel_grace_ms;
    uv_mutex_unlock(&w->ctx.qlock);
    c->cancel_at = uv_hrtime() + grace * 1000000 + 1;
    wbuf b = {0};
    corral__frame_begin(&b, F_CANCEL);
    corral__w_uint(&b, c->wire_id, 8);
    send_frame((uv_stream_t *)&p->sock, &b); /* (a child gone: its exit tells) */
    sent = 1;
  }
  if (sent) arm_grace(p);
}

/* Hand calls to the child while it has free runners, and PIPELINE more. */
static void pump_calls(proxy *p) {
  corral_worker *w = p->w;
  int st = atomic_load(&w->stopping);
  if (st >= WORKER_CANCEL) {
    kill_child(p);
    return;
  }
  if (p->inflight > 0 && !p->killed) cancel_calls(p);
  if (p->dying) return; /* (the calls wait for the next process) */
  corral_call *got[64];
  int dropped;
again:
  dropped = 0;
  int room = p->window - p->inflight;
  for (queue *q = queue_head(&w->taken); q != &w->taken; q = q->next)
    if (queue_data(q, corral_call, node)->wire_state == WIRE_WAITING) room--;
  if (room > 64) room = 64;
  if (room > 0) {
    int n = corral__worker_take(w, got, room);
    for (int i = 0; i < n; i++)
      got[i]->wire_state = WIRE_WAITING;
  }
  /* in order: the first waiting calls go first */
  queue *q = queue_head(&w->taken);
  while (q != &w->taken && p->inflight < p->window) {
    corral_call *c = queue_data(q, corral_call, node);
    q = q->next;
    if (c->wire_state != WIRE_WAITING) continue;
    if (corral_future_state(c->result) >= CORRAL_DONE) { /* its caller cancelled it */
      call_done(w, c);
      dropped++;
      continue;
    }
    int ready = inputs_ready(p, c);
    if (c->wire_id == 0) c->wire_id = ++p->next_id; /* (watched now) */
    if (!ready) break;                              /* calls start in order */
    if (c->tries == 0 && !c->unsent) {
      /* RUNNING from here, and a cancel still stops it (see cancel_calls) */
      atomic_fetch_or(&c->result->flags, FUTURE_HARD);
      if (corral__future_start(c->result) != 0) { /* cancelled */
        call_done(w, c);
        dropped++;
        continue;
      }
    }
    if (send_call(p, c) > 0) return; /* (the child is going: nothing more now) */
  }
  /* calls dropped made room: take more now (the inbox's wake-up for them
   * has come and gone; without this the loop would wait with calls queued) */
  if (dropped > 0 && p->inflight < p->window && !p->killed) goto again;
  /* stopping with nothing left: the child drains and ends */
  uv_mutex_lock(&w->ctx.qlock);
  int empty = w->queued == 0 && queue_empty(&w->overflow);
  uv_mutex_unlock(&w->ctx.qlock);
  if (st == WORKER_DRAIN && empty && queue_empty(&w->taken) && !p->shut) {
    p->shut = 1;
    uv_read_stop((uv_stream_t *)&p->sock); /* (nothing more can come: all is answered) */
    uv_close((uv_handle_t *)&p->sock, on_closed);
  }
}

/* The crash error of a child that ended on its own. */
/* Whether the child's end was ours (a stop), not a crash. */
static int ended_by_us(proxy *p) {
  int st = atomic_load(&p->w->stopping);
  if (p->why[0] == '\0' && p->killed && st >= WORKER_CANCEL) return 1;
  return p->why[0] == '\0' && !p->killed && p->status == 0 && p->signal == 0 && p->shut;
}

/* Why the child ended, as the message of a WorkerCrashed. */
static void crash_message(proxy *p, char *msg, size_t size) {
  const char *name = p->w->name;
  if (p->died[0] != '\0') /* its instance died first, and the child said why */
    snprintf(msg, size, "%s", p->died);
  else if (p->why[0] != '\0')
    snprintf(msg, size, "worker %s crashed: its process sent %s", name, p->why);
  else if (p->signal != 0)
    snprintf(msg, size, "worker %s crashed: its process was killed by signal %d (%s)", name,
             p->signal, strsignal(p->signal));
  else
    snprintf(msg, size, "worker %s crashed: its process exited with status %lld", name,
             (long long)p->status);
}

static void child_ended(proxy *p) {
  corral_worker *w = p->w;
  if (ended_by_us(p)) return;
  char msg[400];
  crash_message(p, msg, sizeof msg);
  corral__worker_crash_text(w, msg);
}

static int spawn_child(proxy *p) {
  corral_worker *w = p->w;
  int sv[2];
  if (program[0] == NULL) return UV_ENOENT;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return UV_EMFILE;
  int fv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fv) != 0) {
    close(sv[0]);
    close(sv[1]);
    return UV_EMFILE;
  }
  char env_pid[64];
  snprintf(env_pid, sizeof env_pid, "CORRAL_PARENT_PID=%ld", (long)getpid());
  extern char **environ;
  int nenv = 0;
  while (environ[nenv] != NULL)
    nenv++;
  char **env = malloc(sizeof(char *) * (size_t)(nenv + 4));
  if (env == NULL) {
    close(sv[0]);
    close(sv[1]);
    close(fv[0]);
    close(fv[1]);
    return UV_ENOMEM;
  }
  int k = 0, preload = 0;
  for (int i = 0; i < nenv; i++) {
    if (strncmp(environ[i], "CORRAL_PARENT_PID=", 18) == 0) continue;
    if (strncmp(environ[i], "CORRAL_TRACE_CHILD=", 19) == 0) continue;
    preload |= strncmp(environ[i], "LD_PRELOAD=", 11) == 0;
    env[k++] = environ[i];
  }
  env[k++] = env_pid;
  /* while a trace runs: where the child writes its events (trace.c) */
  char env_trace[4200];
  if (corral__trace_child_env(env_trace, sizeof env_trace)) env[k++] = env_trace;
  /* CORRAL_PRELOAD (the test suite's sanitizer runtime, which its own
   * process took out of LD_PRELOAD for the shells it starts): the child
   * preloads it */
  char env_preload[4200];
  const char *cp = getenv("CORRAL_PRELOAD");
  if (!preload && cp != NULL && *cp != '\0' && strlen(cp) < 4000) {
    snprintf(env_preload, sizeof env_preload, "LD_PRELOAD=%s", cp);
    env[k++] = env_preload;
  }
  env[k] = NULL;
  uv_stdio_container_t stdio[5];
  stdio[0].flags = UV_IGNORE;
  for (int i = 0; i < 2; i++) {
    outlet *o = &p->out[i];
    o->p = p;
    o->fd = 1 + i;
    o->line.len = 0;
    if (isatty(o->fd)) {
      stdio[1 + i].flags = UV_INHERIT_FD;
      stdio[1 + i].data.fd = o->fd;
    } else {
      uv_pipe_init(p->loop, &o->pipe, 0);
      o->pipe.data = o;
      o->open = 1;
      p->handles++;
      stdio[1 + i].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
      stdio[1 + i].data.stream = (uv_stream_t *)&o->pipe;
    }
  }
  stdio[3].flags = UV_INHERIT_FD;
  stdio[3].data.fd = sv[1];
  stdio[4].flags = UV_INHERIT_FD;
  stdio[4].data.fd = fv[1];
  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.file = program[0];
  o.args = program;
  o.env = env;
  o.exit_cb = on_child_exit;
  o.stdio = stdio;
  o.stdio_count = 5;
  p->proc.data = p;
  int rc = uv_spawn(p->loop, &p->proc, &o);
  free(env);
  close(sv[1]);
  close(fv[1]);
  if (rc != 0) {
    close(sv[0]);
    close(fv[0]);
    uv_close((uv_handle_t *)&p->proc, NULL);
    for (int i = 0; i < 2; i++)
      outlet_close(&p->out[i]);
    return rc;
  }
  for (int i = 0; i < 2; i++)
    if (p->out[i].open) uv_read_start((uv_stream_t *)&p->out[i].pipe, on_alloc, on_output);
  p->spawned = 1;
  p->proc.data = p;
  p->handles++;
  uv_pipe_init(p->loop, &p->sock, 0);
  p->sock.data = p;
  uv_pipe_open(&p->sock, sv[0]);
  p->handles++;
  p->fdch = fv[0];
  /* its class, its init arguments and the key its bytecode is marked with */
  uint64_t k0, k1;
  corral__codec_key(&k0, &k1);
  wbuf b = {0};
  /* (the ring's descriptor first: the child takes it with BOOT) */
  int ring = p->ring != NULL && send_fd(p->fdch, p->ring_fd) == 0;
  corral__frame_begin(&b, F_BOOT);
  corral__w_uint(&b, k0, 8);
  corral__w_uint(&b, k1, 8);
  corral__w_uint(&b, (uint64_t)w->cap, 4);
  corral__w_uint(&b, ring ? p->ring_n : 0, 4);
  corral__w_bytes(&b, w->name, strlen(w->name));
  corral__w_bytes(&b, w->boot, w->bootlen);
  if (send_frame((uv_stream_t *)&p->sock, &b) != 0) return UV_ENOMEM;
  uv_read_start((uv_stream_t *)&p->sock, on_alloc, on_read);
  return 0;
}

/* The ring of started calls (see the top): twice the window, a power of
 * two; the window is cut to it. Without memory for it, none (the order of
 * calls says which may have started). */
static void make_ring(proxy *p) {
  uint64_t n = 64;
  while (n < 2 * (uint64_t)p->window && n < RING_MAX)
    n *= 2;
  if ((uint64_t)p->window > n) p->window = (int)n;
  p->ring_fd = memfd_create("corral.starts", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (p->ring_fd < 0) return;
  void *m = MAP_FAILED;
  /* (sealed at its size: a child cannot shrink it under the parent's
   * mapping, a SIGBUS here) */
  if (ftruncate(p->ring_fd, (off_t)(n * sizeof *p->ring)) == 0 &&
      fcntl(p->ring_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0)
    m = mmap(NULL, n * sizeof *p->ring, PROT_READ | PROT_WRITE, MAP_SHARED, p->ring_fd, 0);
  if (m == MAP_FAILED) {
    close(p->ring_fd);
    p->ring_fd = -1;
    return;
  }
  p->ring = m;
  p->ring_n = n;
}

/* A write to a child that has died fails with EPIPE on this thread rather
 * than raising SIGPIPE in the whole process (a synchronous signal goes to
 * the thread that wrote; blocked there, it stays pending and harmless). */
static void block_sigpipe(void) {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &s, NULL);
}

/* The child died while the instance runs: start another (restart policy,
 * under the worker's lock: set by corral__process_policy). The calls it
 * had are run again (up to `retries` times each) or fail with why it died;
 * the calls still in the inbox go to the new one. 0: no restart. */
static int restart(proxy *p) {
  corral_worker *w = p->w;
  uv_mutex_lock(&w->ctx.qlock);
  int limit = w->restart_limit, retries = w->retries;
  uint64_t backoff_ms = w->restart_backoff_ms;
  uv_mutex_unlock(&w->ctx.qlock);
  /* a child killed to stop a cancelled call is replaced whatever the
   * policy (the instance did not fail: a call was stopped), at once */
  int cancel_kill = p->cancel_kill && p->killed && p->why[0] == '\0' && p->died[0] == '\0';
  p->cancel_kill = 0;
  uv_timer_stop(&p->grace);
  int st = atomic_load(&w->stopping);
  if (cancel_kill ? st > WORKER_DRAIN
                  : st != WORKER_RUNNING || ended_by_us(p) || p->restarts >= limit)
    return 0;
  if (!cancel_kill) {
    p->restarts++;
    p->in_row++;
  }
  char msg[400];
  if (cancel_kill)
    snprintf(msg, sizeof msg,
             "worker %s crashed: its process was ended to stop a cancelled call that did not "
             "stop within cancel_grace",
             w->name);
  else
    crash_message(p, msg, sizeof msg);
  /* which of the calls it still had started there: the ring says exactly;
   * without it, calls start in order, at most max_concurrency at once, so
   * only the first ones handed over can have started. The others go to the
   * next process as they are. */
  int may_have_run = w->process;
  queue *q = queue_head(&w->taken);
  while (q != &w->taken) {
    corral_call *c = queue_data(q, corral_call, node);
    q = q->next;
    if (c->wire_state != WIRE_SENT) continue;
    int started = may_have_run-- > 0;
    if (p->ring != NULL)
      started = atomic_load_explicit(&p->ring[c->wire_id & (p->ring_n - 1)],
                                     memory_order_acquire) == c->wire_id;
    if (corral_future_state(c->result) >= CORRAL_DONE) { /* cancelled, or timed out */
      call_done(w, c);
      continue;
    }
    if (!started) {
      c->wire_state = WIRE_WAITING;
      c->unsent = 1;
      continue;
    }
    if (c->tries < retries && corral_future_state(c->result) < CORRAL_DONE) {
      c->tries++;
      c->wire_state = WIRE_WAITING; /* (its inputs are settled: sent first, in order) */
      continue;
    }
    corral_future_set_error(c->result, "WorkerCrashed", msg);
    call_done(w, c);
  }
  p->inflight = 0;
  /* the old child's handles go; the new one starts after the back-off
   * (doubling with each restart in a row, at most 10 s), unless a stop
   * comes meanwhile */
  if (!p->shut) uv_close((uv_handle_t *)&p->sock, on_closed);
  uv_close((uv_handle_t *)&p->proc, on_closed);
  while (p->handles > 0)
    uv_run(p->loop, UV_RUN_ONCE);
  close_fdch(p);
  /* (a cancel's restart is not in the row: no back-off) */
  uint64_t delay = cancel_kill ? 0 : backoff_ms << (p->in_row - 1 < 16 ? p->in_row - 1 : 16);
  if (delay > 10000) delay = 10000;
  /* (from here its handles are closed: spawned says so to the caller) */
  p->spawned = 0;
  for (uint64_t end = uv_hrtime() + delay * 1000000; uv_hrtime() < end;) {
    if (atomic_load(&w->stopping) > (cancel_kill ? WORKER_DRAIN : WORKER_RUNNING))
      return 0; /* a stop: what is left is its */
    uv_sleep(5);
  }
  p->in.len = 0;
  if (p->ring != NULL) /* (the ids of this child's calls only) */
    for (uint64_t i = 0; i < p->ring_n; i++)
      atomic_store_explicit(&p->ring[i], 0, memory_order_relaxed);
  p->exited = p->eof = p->killed = p->shut = p->dying = 0;
  p->died[0] = '\0';
  p->why[0] = '\0';
  int rc = spawn_child(p);
  if (rc == 0) return 1;
  if (p->spawned) { /* spawned, but the BOOT frame could not be sent */
    kill_child(p);
    return 1; /* (its exit is seen as any other's) */
  }
  snprintf(msg, sizeof msg, "worker %s crashed: its process died and another could not start: %s",
           w->name, uv_strerror(rc));
  corral__worker_crash_text(w, msg);
  return 0;
}

void corral__process_policy(corral_worker *w, int restart_limit, double backoff, int retries,
                            double cancel_grace) {
  uv_mutex_lock(&w->ctx.qlock);
  w->cancel_grace_ms = cancel_grace > 0 ? (uint64_t)(cancel_grace * 1000) : 0;
  w->restart_limit = restart_limit;
  w->restart_backoff_ms = backoff > 0 ? (uint64_t)(backoff * 1000) : 0;
  w->retries = retries;
  uv_mutex_unlock(&w->ctx.qlock);
}

void corral__process_main(corral_worker *w) {
  block_sigpipe();
  proxy *p = calloc(1, sizeof *p);
  if (p == NULL) {
    corral__worker_crash_text(w, "the worker died: no memory for its process");
    return;
  }
  p->w = w;
  p->fdch = -1;
  p->loop = &w->ctx.loop;
  p->window = w->process + PIPELINE;
  make_ring(p);
  uv_timer_init(p->loop, &p->grace);
  p->grace.data = p;
  int rc = spawn_child(p);
  if (rc != 0) {
    char msg[300];
    snprintf(msg, sizeof msg, "worker %s could not start its process (%s): %s", w->name,
             program[0] ? program[0] : "no program", uv_strerror(rc));
    corral__worker_crash_text(w, msg);
    if (p->spawned) kill_child(p);
  }
  /* (the boot payload stays: a restarted child gets it again) */
  for (;;) {
    while (p->spawned && !p->exited) {
      pump_calls(p);
      corral__ctx_drain(&w->ctx, NULL, NULL); /* inputs that settled: looked at next turn */
      corral__ctx_drain_posts(&w->ctx, on_sync_post, p); /* the child's waits, granted */
      /* (dying: the process is ending, and a stop or a caller waits for its
       * exit event: busy, or the runtime could count every context idle) */
      if (p->inflight > 0 || p->shut || p->killed || p->dying)
        uv_run(p->loop, UV_RUN_ONCE); /* the child works, or is ending: busy */
      else
        corral__ctx_poll(&w->ctx, -1); /* nothing handed over: counted idle while it waits */
    }
    /* it has ended: what it sent and wrote before is read (all of it is in
     * the socket and the pipes already; a descendant that kept one open is
     * not waited for) */
    for (unsigned before = ~0u; p->spawned && before != p->events;) {
      before = p->events;
      uv_run(p->loop, UV_RUN_NOWAIT);
    }
    for (int i = 0; i < 2; i++)
      outlet_close(&p->out[i]);
    drop_syncs(p); /* (what it waited for here: a new child knows nothing of it) */
    if (!p->spawned || !restart(p)) break;
  }
  if (p->spawned) child_ended(p);
  if (p->spawned) {
    if (!p->shut) uv_close((uv_handle_t *)&p->sock, on_closed);
    uv_close((uv_handle_t *)&p->proc, on_closed);
    while (p->handles > 0)
      uv_run(p->loop, UV_RUN_ONCE);
  }
  uv_close((uv_handle_t *)&p->grace, on_closed);
  p->handles++;
  while (p->handles > 0)
    uv_run(p->loop, UV_RUN_ONCE);
  corral__codec_free(w->boot, w->bootlen, w->boot_refs);
  w->boot = NULL;
  w->bootlen = 0;
  close_fdch(p);
  free(p->fds.fds);
  if (p->ring != NULL) {
    munmap((void *)p->ring, p->ring_n * sizeof *p->ring);
    close(p->ring_fd);
  }
  drop_syncs(p);
  free(p->psync);
  for (int i = 0; i < p->ncaps; i++)
    corral__sync_release(p->caps[i]);
  free(p->caps);
  free(p->in.p);
  free(p->out[0].line.p);
  free(p->out[1].line.p);
  free(p);
}

void corral__process_program(const char *const *argv) {
  for (int i = 0; i < 7 && argv[i] != NULL; i++)
    program[i] = strdup(argv[i]);
}

/* ======================================================================== */
/* The child's pump                                                          */
/* ======================================================================== */

typedef struct {
  corral_runtime *rt;
  corral_worker *inner; /* the instance, a thread worker of this runtime */
  void (*body)(corral_worker *w);
  uv_pipe_t sock;
  int fdch; /* descriptors of shared buffers, both ways (descriptor 4) */
  fdq fds;  /* descriptors the parent sent, not taken yet */
  rbuf in;
  int eof, booted, stopping;
  /* the calls handed to the inner worker: result future -> id */
  corral_future **fs;
  uint64_t *ids;
  int n, cap;
  /* requests on the parent's sync objects, sent and not answered */
  corral_sync_waiter **reqs;
  int nreqs, capreqs;
  uint64_t next_req;
} pump;

static void child_fail(const char *why) {
  fprintf(stderr, "corral: process worker: %s\n", why);
  _exit(70);
}

static const char *on_boot(pump *c, rcur *r) {
  frame_boot fb;
  const char *bad = corral__frame_boot(r, &fb);
  if (bad != NULL) return bad;
  uint64_t k0 = fb.k0, k1 = fb.k1, ring_n = fb.ring_n;
  int cap = fb.cap;
  size_t nlen = fb.nlen, blen = fb.blen;
  const char *name = fb.name, *boot = fb.boot;
  if (ring_n > 0) {
    int fd = fdq_take(c->fdch, &c->fds, 1);
    void *m = fd >= 0
                  ? mmap(NULL, ring_n * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                  : MAP_FAILED;
    if (fd >= 0) close(fd);
    if (m == MAP_FAILED) return "no ring of started calls";
    c->rt->ring_mask = ring_n - 1;
    c->rt->start_ring = m;
  }
  corral__codec_set_key(k0, k1);
  char nm[64];
  memcpy(nm, name, nlen);
  nm[nlen] = '\0';
  char *b = dup_bytes(boot, blen);
  int err;
  c->inner = b ? corral__worker_start(c->rt, nm, b, blen, 0, cap, c->body, 0, 0, &err) : NULL;
  if (c->inner == NULL) return "its worker thread could not start";
  c->booted = 1;
  return NULL;
}

static const char *on_call(pump *c, rcur *r) {
  frame_call fc;
  const char *bad = corral__frame_call(r, &fc);
  if (bad != NULL) return bad;
  uint64_t id = fc.id;
  int flags = fc.flags;
  size_t mlen = fc.mlen, plen = fc.plen;
  const char *method = fc.method, *payload = fc.payload;
  uint32_t ndeps = fc.ndeps;
  /* the arguments' descriptors came first (send_call's order), then the
   * inputs', each in its order */
  char *args = dup_bytes(payload, plen);
  int total = 0, lost = 0; /* (descriptors this process could not take: the call fails) */
  if (flags & 1) {
    int k = args == NULL ? -1 : take_shms(c->fdch, &c->fds, args, plen, 0, &total);
    if (k < 0) {
      free(args);
      return "a CALL frame whose shared buffers did not come";
    }
    lost += k;
  }
  const char *why = NULL; /* (a failure ends this process: see child_fail) */
  corral_future **deps = ndeps ? calloc(ndeps, sizeof(corral_future *)) : NULL;
  if (ndeps && deps == NULL) {
    free(args);
    return "out of memory";
  }
  for (uint32_t i = 0; i < ndeps; i++) {
    frame_input in;
    corral__frame_input(r, &in);
    int st = in.state, shm = in.shm;
    size_t n = in.n;
    const char *s = in.bytes;
    deps[i] = corral__future_new();
    if (deps[i] == NULL) {
      why = "out of memory";
      goto fail;
    }
    /* (an input is counted as one a call holds, as the caller's side does) */
    atomic_fetch_add(&deps[i]->deps, 1);
    if (r->bad) continue;
    char *bytes = n ? dup_bytes(s, n) : NULL;
    int tot = 0, k = !shm ? 0 : bytes == NULL ? -1 : take_shms(c->fdch, &c->fds, bytes, n, 0, &tot);
    if (k < 0) {
      free(bytes);
      why = "a CALL frame whose shared buffers did not come";
      goto fail;
    }
    if (k > 0) { /* (its descriptors are closed; the rest are still taken) */
      free(bytes);
      lost += k;
      total += tot;
      continue;
    }
    total += tot;
    if (shm)
      corral__future_settle_peer_shm(deps[i], st, bytes, n, corral__codec_discard);
    else
      corral__future_settle_peer(deps[i], st, bytes, n);
  }
  why = corral__frame_done(r, "a malformed CALL frame");
  if (why == NULL && lost > 0) {
    /* every descriptor sent was taken (the sockets are in step): the call
     * fails, and this process serves on */
    char msg[256];
    size_t elen = 0;
    limit_message(msg, sizeof msg, "its arguments and inputs hold", total, lost);
    char *e = corral__future_error_payload("CodecError", msg, &elen);
    wbuf b = {0};
    corral__frame_begin(&b, F_RESULT);
    corral__w_uint(&b, id, 8);
    corral__w_uint(&b, CORRAL_FAILED, 1);
    corral__w_bytes(&b, e, e ? elen : 0);
    free(e);
    if (send_frame((uv_stream_t *)&c->sock, &b) != 0) why = "out of memory";
    goto fail; /* (what it holds is released: not a failure unless why says so) */
  }
  corral_future *result = why == NULL ? corral__future_new() : NULL;
  /* (its descriptors close with its arguments: see corral__call_drop_payload) */
  corral_call *call = result && args ? corral__call_new(method, mlen, result, args, plen, flags & 1,
                                                        deps, (int)ndeps)
                                     : NULL;
  if (call == NULL) {
    corral_future_release(result);
    if (why == NULL) why = "out of memory";
    goto fail;
  }
  call->wire_id = id; /* (written in the ring as it starts: see the top) */
  corral_future_retain(result);
  if (c->n == c->cap) {
    int cap = c->cap ? c->cap * 2 : 64;
    corral_future **fs = realloc(c->fs, sizeof(corral_future *) * (size_t)cap);
    uint64_t *ids = fs ? realloc(c->ids, sizeof *ids * (size_t)cap) : NULL;
    if (fs) c->fs = fs;
    if (ids == NULL) return "out of memory";
    c->ids = ids;
    c->cap = cap;
  }
  c->fs[c->n] = result;
  c->ids[c->n] = id;
  c->n++;
  corral__future_watch(result, &c->rt->home, corral__ctx_post);
  corral_future *accepted = NULL;
  int rc = corral__worker_push(c->inner, call, &accepted);
  if (rc == CORRAL_EAGAIN) {
    corral_future_release(accepted); /* it waits in the overflow, in order */
  } else if (rc != 0) {
    /* the instance has died and this process is ending: the call goes back
     * unstarted (send_result answers PENDING, with why it died) */
    corral__call_free(call);
    corral__future_settle(result, CORRAL_CANCELLED, NULL, 0);
  }
  return NULL;
fail:
  for (uint32_t i = 0; i < ndeps; i++)
    corral_future_release(deps[i]);
  free(deps);
  free(args);
  return why;
}

/* The parent cancelled a call: cancelled here where it waits, or not
 * started (one that runs on is the parent's to stop). One answered
 * already is not here any more. */
static const char *on_cancel(pump *c, rcur *r) {
  uint64_t id;
  const char *bad = corral__frame_cancel(r, &id);
  if (bad != NULL) return bad;
  for (int i = 0; i < c->n; i++)
    if (c->ids[i] == id) corral__future_cancel(c->fs[i]);
  return NULL;
}

/* A request on a parent's sync object, or its cancel or undo, to send. */
static void send_sync(pump *c, uint64_t id, corral_sync_waiter *rec, int op) {
  frame_value fv;
  value_of(&rec->val, &fv); /* (a child's values are bytes: no references) */
  wbuf b = {0};
  corral__frame_begin(&b, F_SYNC);
  corral__w_uint(&b, id, 8);
  corral__w_uint(&b, rec->s->remote, 8);
  corral__w_uint(&b, (uint64_t)op, 1);
  corral__w_uint(&b, (uint64_t)(int64_t)rec->n, 8);
  corral__w_value(&b, &fv);
  if (send_frame((uv_stream_t *)&c->sock, &b) != 0) child_fail("out of memory");
}

static void on_sync_out(void *ud, corral_post *post) {
  pump *c = ud;
  corral_sync_waiter *rec = (corral_sync_waiter *)post;
  corral_sync *s = rec->s;
  uv_mutex_lock(&s->lock);
  int st = rec->rstate;
  if (st == SYNC_R_TO_PUMP) {
    if (rec->abandoned) { /* its context dropped it before it went */
      uv_mutex_unlock(&s->lock);
      corral__sync_waiter_free(rec);
      return;
    }
    if (rec->cancel_asked) { /* its task gave up before it went */
      rec->state = SYNC_GONE;
      rec->rstate = SYNC_R_DONE;
      corral__ctx_post_item(rec->ctx, &rec->post);
      uv_mutex_unlock(&s->lock);
      return;
    }
    rec->rstate = SYNC_R_SENT;
    rec->wire_id = ++c->next_req;
  }
  uv_mutex_unlock(&s->lock);
  if (st == SYNC_R_TO_PUMP) {
    if (c->nreqs == c->capreqs) {
      int cap = c->capreqs ? c->capreqs * 2 : 16;
      corral_sync_waiter **r = realloc(c->reqs, sizeof(corral_sync_waiter *) * (size_t)cap);
      if (r == NULL) child_fail("out of memory");
      c->reqs = r;
      c->capreqs = cap;
    }
    c->reqs[c->nreqs++] = rec;
    send_sync(c, rec->wire_id, rec, rec->op);
    free_item(&rec->val); /* (the pump's: nobody else reads it while it is SENT) */
  } else if (st == SYNC_R_CANCEL) {
    wbuf b = {0};
    corral__frame_begin(&b, F_SYNC_CANCEL);
    corral__w_uint(&b, rec->wire_id, 8);
    if (send_frame((uv_stream_t *)&c->sock, &b) != 0) child_fail("out of memory");
  }
}

static const char *on_sync_reply(pump *c, rcur *r) {
  frame_sync_reply fr;
  const char *bad = corral__frame_sync_reply(r, &fr);
  if (bad != NULL) return bad;
  corral_sync_waiter *rec = NULL;
  for (int i = 0; i < c->nreqs; i++)
    if (c->reqs[i]->wire_id == fr.id) {
      rec = c->reqs[i];
      c->reqs[i] = c->reqs[--c->nreqs];
      break;
    }
  if (rec == NULL) return "a SYNC_REPLY for no request";
  sync_item it;
  if (item_of(&fr.v, &it) != 0) return "a SYNC_REPLY with a malformed value";
  corral_sync *s = rec->s;
  uv_mutex_lock(&s->lock);
  /* (a cancel of it not sent yet is not sent: this is the answer; under
   * the lock, as its task posts that cancel under it) */
  corral__ctx_unpost(&c->rt->home, &rec->post);
  if (rec->abandoned) { /* its context is gone: so is what it was granted */
    uv_mutex_unlock(&s->lock);
    free_item(&it);
    corral__sync_waiter_free(rec);
    return NULL;
  }
  rec->state = fr.state;
  rec->ival = (long)fr.ival;
  rec->info[0] = (long)fr.count;
  rec->info[1] = fr.closed;
  rec->info[2] = (long)fr.unfinished;
  rec->info[3] = (long)fr.waiting;
  rec->info[4] = (long)fr.putting;
  rec->info[5] = (long)fr.cap;
  free_item(&rec->val);
  rec->val = it;
  rec->rstate = SYNC_R_DONE;
  corral__ctx_post_item(rec->ctx, &rec->post); /* (under the lock: see sync.c) */
  uv_mutex_unlock(&s->lock);
  return NULL;
}

static const char *on_frame(void *ud, rcur *r) {
  pump *c = ud;
  int type = (int)corral__r_uint(r, 1);
  if (!c->booted) return type == F_BOOT ? on_boot(c, r) : "a first frame that is not BOOT";
  if (type == F_CALL) return on_call(c, r);
  if (type == F_CANCEL) return on_cancel(c, r);
  if (type == F_SYNC_REPLY) return on_sync_reply(c, r);
  return "a frame of an unknown type";
}

static void child_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  pump *c = s->data;
  if (nread < 0) {
    c->eof = 1;
    uv_read_stop(s);
    return;
  }
  if (nread == 0) return;
  if (corral__rbuf_add(&c->in, buf->base, (size_t)nread) != 0) child_fail("out of memory");
  const char *why = corral__rbuf_frames(&c->in, on_frame, c);
  if (why != NULL) child_fail(why);
}

/* A call's result settled: sent to the parent. One that the instance's
 * death cancelled before it started (os.exit, out of memory) goes back as
 * PENDING, for the next process. */
static void send_result(void *ud, corral_future *f) {
  pump *c = ud;
  for (int i = 0; i < c->n; i++) {
    if (c->fs[i] != f) continue;
    const void *mp = NULL;
    size_t n = 0;
    int state = corral_future_state(f);
    char *why = NULL;
    /* (in a child, the calls a dead instance had not started are settled
     * cancelled: see worker.c's settle_all; they go back with why it died) */
    if (state == CORRAL_CANCELLED && atomic_load(&c->inner->stopping) == WORKER_CRASHED) {
      state = CORRAL_PENDING;
      why = corral__worker_crash_copy(c->inner, &n);
      mp = why;
      if (why == NULL) n = 0;
    } else {
      corral_future_payload(f, &mp, &n);
    }
    /* its buffers made fit for the parent (a payload with references has a
     * discard: see corral__future_settle_refs), and the descriptors of
     * those in shared memory sent first */
    char *fit = NULL;
    size_t fitn = 0;
    if (f->discard != NULL && why == NULL) {
      int failed;
      fit = corral__codec_for_process(mp, n, &fitn, &failed);
      if (failed) child_fail("a result's buffers could not be made ready for the parent");
      if (fit != NULL) {
        mp = fit;
        n = fitn;
      }
    }
    int shm = f->discard != NULL && why == NULL ? send_shms(c->fdch, mp, n) : 0;
    if (shm < 0) child_fail("the socket of shared buffers failed");
    wbuf b = {0};
    corral__frame_begin(&b, F_RESULT);
    corral__w_uint(&b, c->ids[i], 8);
    corral__w_uint(&b, (uint64_t)state | (shm > 0 ? FRAME_SHM : 0), 1);
    corral__w_bytes(&b, mp, n);
    free(why);
    if (fit != NULL) { /* (copied into the frame; its descriptors are sent) */
      corral__codec_discard(fit, fitn);
      free(fit);
    }
    if (send_frame((uv_stream_t *)&c->sock, &b) != 0) {
      /* (its descriptors are on their way: the sockets would be out of step) */
      if (shm > 0) child_fail("a result with shared buffers could not be sent");
      /* too large (or no memory): the caller gets why instead */
      static const char big[] = "a result over 1 GiB cannot come back from a process worker";
      size_t elen;
      char *e = corral__future_error_payload("CodecError", big, &elen);
      wbuf eb = {0};
      corral__frame_begin(&eb, F_RESULT);
      corral__w_uint(&eb, c->ids[i], 8);
      corral__w_uint(&eb, CORRAL_FAILED, 1);
      corral__w_bytes(&eb, e, e ? elen : 0);
      free(e);
      if (send_frame((uv_stream_t *)&c->sock, &eb) != 0) child_fail("out of memory");
    }
    corral_future_release(f);
    c->fs[i] = c->fs[c->n - 1];
    c->ids[i] = c->ids[c->n - 1];
    c->n--;
    return;
  }
}

int corral__process_child(corral_runtime *rt, int fd, void (*body)(corral_worker *w)) {
  /* it never outlives its parent; what it starts does not get the socket */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  block_sigpipe();
  fcntl(fd + 1, F_SETFD, FD_CLOEXEC);
  const char *ppid = getenv("CORRAL_PARENT_PID");
  if (ppid != NULL && (long)getppid() != atol(ppid)) _exit(70);
  pump c;
  memset(&c, 0, sizeof c);
  c.rt = rt;
  c.fdch = fd + 1;
  rt->child = 1;
  c.body = body;
  uv_loop_t *loop = &rt->home.loop;
  uv_pipe_init(loop, &c.sock, 0);
  c.sock.data = &c;
  if (uv_pipe_open(&c.sock, fd) != 0) child_fail("no socket to its parent");
  uv_read_start((uv_stream_t *)&c.sock, on_alloc, child_read);
  for (;;) {
    corral__ctx_drain(&rt->home, send_result, &c);
    corral__ctx_drain_posts(&rt->home, on_sync_out, &c);
    if (c.eof && !c.stopping) {
      /* the parent closed its end: what is queued is served, then it ends */
      if (c.inner == NULL) break;
      c.stopping = 1;
      corral__worker_stop(c.inner, WORKER_DRAIN);
    }
    if (c.stopping && corral_future_state(c.inner->stopped) >= CORRAL_DONE && c.n == 0) break;
    if (c.inner != NULL && corral_future_state(c.inner->stopped) >= CORRAL_DONE && c.n == 0 &&
        !c.stopping) {
      /* the instance died (os.exit, out of memory): so does the process */
      break;
    }
    uv_run(loop, UV_RUN_ONCE);
  }
  int code = 0;
  if (c.inner != NULL) {
    if (atomic_load(&c.inner->stopping) == WORKER_CRASHED && !c.stopping) {
      int x = atomic_load(&rt->exit_code); /* os.exit(n) in a method: n */
      code = x > 0 ? x - 1 : 1;
    }
    corral__worker_join(c.inner);
  }
  uv_close((uv_handle_t *)&c.sock, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  char terr[256];
  long tn;
  corral__trace_stop(terr, sizeof terr, &tn); /* its events, for the parent's trace */
  fflush(NULL);
  _exit(code);
}

/* queue.h: an intrusive circular doubly linked list, after libuv's queue.h. */
#ifndef CORRAL_QUEUE_H
#define CORRAL_QUEUE_H

#include <stddef.h>

typedef struct queue {
  struct queue *next;
  struct queue *prev;
} queue;

#define queue_data(ptr, type, field) ((type *)((char *)(ptr)-offsetof(type, field)))

static inline void queue_init(queue *q) { q->next = q->prev = q; }
static inline int queue_empty(const queue *q) { return q->next == q; }
static inline queue *queue_head(const queue *q) { return q->next; }

static inline void queue_insert_tail(queue *h, queue *q) {
  q->next = h;
  q->prev = h->prev;
  q->prev->next = q;
  h->prev = q;
}

static inline void queue_insert_head(queue *h, queue *q) {
  q->next = h->next;
  q->prev = h;
  q->next->prev = q;
  h->next = q;
}

static inline void queue_remove(queue *q) {
  q->prev->next = q->next;
  q->next->prev = q->prev;
  q->next = q->prev = q;
}

/* Move every element of h onto the empty list n; h is left empty. */
static inline void queue_move(queue *h, queue *n) {
  if (queue_empty(h)) {
    queue_init(n);
    return;
  }
  n->next = h->next;
  n->prev = h->prev;
  n->next->prev = n;
  n->prev->next = n;
  queue_init(h);
}

#endif

/* corral.h: the public C API of corral, a concurrency runtime on libuv and LuaJIT.
 *
 * Error convention: functions that can fail return 0 on success and a
 * negative CORRAL_E* code on failure; corral_strerror() names the code.
 * Functions returning pointers return NULL on failure.
 *
 * Threads: a runtime and its lua_State belong to the thread that opened it.
 * Futures are the exception: corral_future_* may be called from any thread.
 */
#ifndef CORRAL_H
#define CORRAL_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CORRAL_VERSION "0.1.0"

/* What a build of corral exports: these declarations, and nothing else (the
 * library is built with -fvisibility=hidden). */
#if defined(__GNUC__) && !defined(CORRAL_STATIC_ONLY)
#define CORRAL_API __attribute__((visibility("default")))
#else
#define CORRAL_API
#endif

typedef struct lua_State lua_State;
typedef struct corral_runtime corral_runtime;
typedef struct corral_future corral_future;

/* Error codes (negative on return). */
enum {
  CORRAL_OK = 0,
  CORRAL_EINVAL = -1, /* a bad argument */
  CORRAL_ESTATE = -2, /* the future is already settled */
  CORRAL_ETIMEDOUT = -3,
  CORRAL_ENOMEM = -4,
  CORRAL_ELUA = -5, /* Lua code raised an error; it was printed */
  CORRAL_EEXIT = -6 /* corral.exit was called: the runtime has stopped */
};

/* The states of a future. DONE, FAILED and CANCELLED are final. */
typedef enum {
  CORRAL_PENDING = 0,
  CORRAL_RUNNING = 1,
  CORRAL_DONE = 2,
  CORRAL_FAILED = 3,
  CORRAL_CANCELLED = 4
} corral_state;

CORRAL_API const char *corral_version(void);
CORRAL_API const char *corral_strerror(int err);

/* ---- Runtime ---------------------------------------------------------- */

/* Open a runtime with a new lua_State (standard libraries opened) and its
 * own libuv loop. */
CORRAL_API corral_runtime *corral_open(void);
/* The runtime's lua_State, to register host functions or push values. */
CORRAL_API lua_State *corral_lua(corral_runtime *rt);
/* The runtime that a lua_State belongs to (NULL when corral is not loaded). */
CORRAL_API corral_runtime *corral_from_lua(lua_State *L);
/* Make the C function `fn` a global named `name` in the runtime's state and
 * in every thread worker's state, those started before this call and after:
 * a worker started after has it from its start (a standard global of that
 * name, such as print, replaced, as in the runtime's state); one started
 * before finds it when its code first uses the name (so a name its state
 * already has, such as print, stays its own there). It runs on the
 * thread of the state that calls it, so a function that workers call must be
 * thread-safe. (A worker finds it through its _G's __index: a script that
 * replaces that metatable there finds it no more.) A process worker cannot
 * call it (another process): using the
 * name there raises an error that says so (a name registered after the
 * process worker started is a nil global there). A name is registered once:
 * again with the same function does nothing; with another, or a NULL or
 * empty name, or a NULL function: CORRAL_EINVAL. Call it from the runtime's
 * thread. */
CORRAL_API int corral_register(corral_runtime *rt, const char *name, int (*fn)(lua_State *L));
/* Run a file or a string as a task (neither sets the global `arg`: the
 * host sets it if its scripts need one). They return at once;
 * corral_step/corral_run drive them. Errors that stop the chunk from
 * loading return CORRAL_ELUA (and print them); an error while the chunk
 * runs fails its task and is reported on stderr when nobody retrieves it. */
CORRAL_API int corral_dofile(corral_runtime *rt, const char *path);
CORRAL_API int corral_dostring(corral_runtime *rt, const char *code);
/* The same, giving the host the chunk's future (a reference of its own, to
 * release): it settles with the chunk's results, or fails with its run-time
 * error (read with corral_future_error_message). NULL when the chunk does not
 * load (the error is printed). */
CORRAL_API corral_future *corral_dofile_future(corral_runtime *rt, const char *path);
CORRAL_API corral_future *corral_dostring_future(corral_runtime *rt, const char *code);
/* The C host's corral.spawn: call the Lua function named `fn` as a task
 * with the `nargs` values on top of
 * corral_lua(rt)'s stack as its arguments (pushed by the host, last on top;
 * they are popped), and give the host its future (a reference of its own,
 * to release): it settles with the function's results, or fails with its
 * error (not reported: the host's to read). `fn` is a global ("update"), a
 * field of one ("game.update"), or a function of a module that `require`
 * finds ("mymod.update": the longest prefix that is a module). NULL when
 * there is no such function, or loading its module fails, or after
 * corral.exit: the error is printed on stderr and the arguments are popped
 * (a negative nargs, or more than the stack holds, pops nothing). Returns at
 * once: corral_step/corral_run run the task. */
CORRAL_API corral_future *corral_spawn(corral_runtime *rt, const char *fn, int nargs);
/* One turn of the loop that never blocks: runs ready tasks, due timers and
 * completions. Returns 1 while anything is pending, 0 when idle, or a
 * negative code: CORRAL_EEXIT once corral.exit was called (see
 * corral_exit_status). A host calls it once a frame. */
CORRAL_API int corral_step(corral_runtime *rt);
/* Drive the loop until nothing is pending, or nothing can progress any more
 * (every worker idle, no timer, no future that host code may settle), or
 * corral.exit is called (CORRAL_EEXIT). */
CORRAL_API int corral_run(corral_runtime *rt);
/* corral.exit(n) in an embedded runtime stops the runtime and leaves the
 * process to the host: the workers are asked to stop (their calls
 * cancelled), the task that called it goes no further, no other task runs,
 * corral_step and corral_run return CORRAL_EEXIT from then on (and
 * corral_dostring and the others refuse to start anything: CORRAL_EEXIT or
 * NULL); the host then calls corral_close. The status n (0 to 255) is
 * here, or -1 until corral.exit was called. (The `corral` command is the
 * exception: there corral.exit ends the process, as its docs say.) */
CORRAL_API int corral_exit_status(corral_runtime *rt);
/* The loop contract, as libuv states its own: a host with an event loop of
 * its own polls corral_backend_fd (readable when another thread settled
 * something for this loop) with corral_backend_timeout as its timeout, then
 * calls corral_step; it never waits longer than it must. The timeout is in
 * milliseconds: 0 when work is ready now, the time to the next due timer,
 * or -1 when nothing is due (only the fd can bring work). */
CORRAL_API int corral_backend_fd(corral_runtime *rt);
CORRAL_API int corral_backend_timeout(corral_runtime *rt);
/* Close the runtime: the workers finish what they were given (while they
 * can progress), are stopped and joined, every thread the runtime started
 * with them; unretrieved errors are reported on stderr. After corral.exit
 * the workers' calls are cancelled instead (they get a second to stop), and
 * what is still pending fails as abandoned. A runtime from corral_open is
 * freed with its lua_State. One opened by `require "corral"` in a host's own
 * lua_State is driven until idle here (not after corral.exit) and freed when
 * the host closes that state (corral_close does not close it). Call it
 * from the host's own code: called while the runtime runs Lua code (from a
 * host function a script called) it does nothing but say so on stderr. */
CORRAL_API void corral_close(corral_runtime *rt);

/* ---- Futures (thread-safe) -------------------------------------------- */

/* A new pending future with one reference, owned by the caller. While it is
 * pending the runtime counts it as one that the host may still settle. */
CORRAL_API corral_future *corral_future_new(corral_runtime *rt);
CORRAL_API void corral_future_retain(corral_future *f);
CORRAL_API void corral_future_release(corral_future *f);
CORRAL_API corral_state corral_future_state(corral_future *f);
/* Settle with results: `mp` is a MessagePack array of the result values
 * (copied; NULL and 0: no values). The bytes are checked as untrusted:
 * exactly one complete array with nothing after it, arrays and maps
 * nested at most 102 deep (the outer array included), of values the
 * decoder takes from outside the process (nil, booleans, numbers, strings,
 * binary, arrays, maps without nil or NaN keys, timestamps, and corral's
 * REF and BYTES extensions when well formed; never a MODULE or CFUNC
 * reference, whose decoding would load code): anything else is
 * CORRAL_EINVAL and leaves the future as it was. Returns
 * CORRAL_ESTATE when already settled. */
CORRAL_API int corral_future_set_result(corral_future *f, const void *mp, size_t len);
/* Settle with one value, encoded by corral (no MessagePack to write): a
 * string of len bytes (copied; any bytes), a number, nil, or a boolean
 * (nonzero is true). CORRAL_ESTATE when already settled. (These, and
 * corral_future_set_result and _set_error, refuse a task's future that
 * corral_spawn or corral_do*_future gave: CORRAL_ESTATE; its task settles
 * it.) */
CORRAL_API int corral_future_set_string(corral_future *f, const char *s, size_t len);
CORRAL_API int corral_future_set_number(corral_future *f, double value);
CORRAL_API int corral_future_set_nil(corral_future *f);
CORRAL_API int corral_future_set_bool(corral_future *f, int value);
/* Read the first result of a DONE future: a string (*s points into the
 * future's payload, valid while the caller holds a reference; it is *len
 * bytes and NOT NUL-terminated) or a number. CORRAL_ESTATE when the future
 * is not DONE (pending, failed or cancelled); CORRAL_EINVAL when the first
 * result is not of that type (or there is none). */
CORRAL_API int corral_future_get_string(corral_future *f, const char **s, size_t *len);
CORRAL_API int corral_future_get_number(corral_future *f, double *out);
/* Settle as failed with an error of the given kind and message. */
CORRAL_API int corral_future_set_error(corral_future *f, const char *kind, const char *message);
/* Cancel a future that is pending, or running but suspended at a wait (a
 * call whose method waits: it gets CancelledError there), or a process
 * worker's call (stopped there, or its process ended after cancel_grace).
 * CORRAL_ESTATE when it is settled, or running code in this process (which
 * cannot be interrupted). */
CORRAL_API int corral_future_cancel(corral_future *f);
/* Block the calling (non-loop) thread until the future settles or the timeout
 * (seconds; negative for none) passes: 0 or CORRAL_ETIMEDOUT. */
CORRAL_API int corral_future_wait(corral_future *f, double timeout);
/* The encoded payload of a settled future: the MessagePack result array, or
 * the error for a failed one. Valid while the caller holds a reference. */
CORRAL_API int corral_future_payload(corral_future *f, const void **mp, size_t *len);
/* The message of a failed future's error, into buf (cut to size): 0,
 * CORRAL_ESTATE when it has not failed, CORRAL_EINVAL for bad arguments. */
CORRAL_API int corral_future_error_message(corral_future *f, char *buf, size_t size);

/* Push a future onto a Lua stack of the runtime as a corral future object
 * (the object takes its own reference). Lua sees it settle, from any thread. */
CORRAL_API void corral_push_future(lua_State *L, corral_future *f);
/* The future at a stack index, or NULL when the value is not a future. The
 * reference is borrowed. The host may settle it: the Lua future follows. */
CORRAL_API corral_future *corral_to_future(lua_State *L, int idx);

/* The Lua module entry point: `require "corral"` from any LuaJIT host. */
CORRAL_API int luaopen_corral(lua_State *L);

#ifdef __cplusplus
}
#endif
#endif /* CORRAL_H */

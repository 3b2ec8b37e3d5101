/*
 * The ABI between ngx_http_gateway_module.c and the Rust side of the nginx module,
 * both ways.
 *
 * ngx_http_gateway_module.c includes this header, so the C compiler checks its
 * definitions and uses against it; build.rs has bindgen read it, so Rust calls the
 * helpers through these declarations and src/nginx/abi.rs fails the build when a
 * Rust entry point's signature differs from its declaration here. Naming decides
 * the direction: gateway_ngx_* are defined in C, every other gateway_* in Rust.
 */

#ifndef NGX_HTTP_GATEWAY_MODULE_H
#define NGX_HTTP_GATEWAY_MODULE_H

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

/* --- Defined in ngx_http_gateway_module.c, called from Rust: helpers made of nginx macros --- */

/* Log one line at level to log. */
void gateway_ngx_log(ngx_log_t *log, ngx_uint_t level, const char *msg);
/* This module's context of the request (NULL until set). */
void *gateway_ngx_get_ctx(ngx_http_request_t *r);
void gateway_ngx_set_ctx(ngx_http_request_t *r, void *ctx);
/* The core module's location and server configurations of the request. */
ngx_http_core_loc_conf_t *gateway_ngx_core_loc_conf(ngx_http_request_t *r);
ngx_http_core_srv_conf_t *gateway_ngx_core_srv_conf(ngx_http_request_t *r);
/* Arm the timer of ev to fire in ms milliseconds; disarm it (if armed). */
void gateway_ngx_add_timer(ngx_event_t *ev, ngx_msec_t ms);
void gateway_ngx_del_timer(ngx_event_t *ev);
/* Watch fd for reading, level-triggered, as a connection of its own whose read
 * handler is handler; NULL if nginx has no connection or event left. */
ngx_connection_t *gateway_ngx_watch_fd(ngx_cycle_t *cycle, ngx_fd_t fd,
                                       ngx_event_handler_pt handler);
/* Send a whole response of len bytes from data (copied to the pool), with this
 * status and Content-Type; returns what the content handler returns. */
ngx_int_t gateway_ngx_send_whole(ngx_http_request_t *r, ngx_uint_t status,
                                 const u_char *content_type, size_t type_len,
                                 const u_char *data, size_t len);
/* Give the links of chain cl (not their buffers) back to pool for reuse. */
void gateway_ngx_free_chain(ngx_pool_t *pool, ngx_chain_t *cl);

/* --- Defined in Rust, called by ngx_http_gateway_module.c --- */

/* src/nginx/config.rs: configuration records and directives */
void *gateway_create_main_conf(ngx_conf_t *cf);
char *gateway_init_main_conf(ngx_conf_t *cf, void *conf, ngx_uid_t user,
                             ngx_gid_t group);
void *gateway_create_loc_conf(ngx_conf_t *cf);
char *gateway_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child,
                             void *mcf);
char *gateway_conf_app(ngx_conf_t *cf, void *lcf, void *mcf,
                       ngx_http_core_loc_conf_t *clcf);
char *gateway_conf_mode(ngx_conf_t *cf, void *lcf, void *mcf);
char *gateway_conf_daemon(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *gateway_conf_python_home(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *gateway_conf_python_path(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *gateway_conf_threads(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *gateway_conf_shared_interpreter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *gateway_conf_preload(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *gateway_conf_slow_request(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *gateway_conf_status_counters(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

/* src/nginx/daemons.rs: the daemon supervisor's start in the master */
ngx_int_t gateway_init_module(ngx_cycle_t *cycle, void *mcf, ngx_uint_t test,
                              ngx_uid_t user, ngx_gid_t group, const ngx_str_t *pid,
                              ngx_int_t worker_processes, ngx_uint_t daemonizing);

/* src/nginx/runtime.rs: a worker's start and exit */
ngx_int_t gateway_init_process(ngx_cycle_t *cycle, void *mcf,
                               ngx_int_t worker_processes);
void gateway_exit_process(ngx_cycle_t *cycle);

/* src/nginx/request.rs: the content handler */
ngx_int_t gateway_handle_request(ngx_http_request_t *r, void *lcf);

/* src/nginx/status.rs: the status page's content handler */
ngx_int_t gateway_status_request(ngx_http_request_t *r);

#endif /* NGX_HTTP_GATEWAY_MODULE_H */

/*
 * The ABI between mod_gateway.c and the Rust side of the Apache module, both ways.
 *
 * mod_gateway.c includes this header, so the C compiler checks its definitions and
 * uses against it; build.rs has bindgen read it, so Rust calls the helpers through
 * these declarations and src/apache/abi.rs fails the build when a Rust entry point's
 * signature differs from its declaration here. Naming decides the direction:
 * gateway_ap_* are defined in C, every other gateway_* in Rust.
 */

#ifndef MOD_GATEWAY_H
#define MOD_GATEWAY_H

#include "httpd.h"
#include "http_config.h"
#include "apr_buckets.h"
#include "apr_file_io.h"

/* --- Defined in mod_gateway.c, called from Rust: helpers made of APR and httpd macros --- */

/* Log one line to the error log of r (if any) or s, tagged with this module. */
void gateway_ap_log(const server_rec *s, const request_rec *r, int level,
                    const char *msg);
/* The module's slot in a configuration vector. */
int gateway_ap_module_index(void);
/* Write a block to the client (flushed if asked); *bbp is the request's brigade,
 * made on first use (start with NULL). */
apr_status_t gateway_ap_write(request_rec *r, apr_bucket_brigade **bbp,
                              const char *data, apr_size_t len, int flush);
/* Send len bytes of an open file from offset, before returning. */
apr_status_t gateway_ap_send_file(request_rec *r, apr_bucket_brigade **bbp,
                                  apr_file_t *file, apr_off_t offset, apr_size_t len);
/* End a complete response and push it out. */
apr_status_t gateway_ap_finish(request_rec *r);
/* End a response that broke after its headers were sent: truncated, connection closed. */
void gateway_ap_abort_response(request_rec *r);
/* The descriptor of the client's socket, or -1 when the request has none of its
 * own (an HTTP/2 stream shares its connection with others). */
int gateway_ap_client_fd(request_rec *r);
/* Close httpd's listening sockets in every child forked from now on. */
void gateway_ap_close_listeners_at_fork(void);

/* --- Defined in Rust, called by mod_gateway.c --- */

/* src/apache/config.rs: configuration records and directives */
void *gateway_create_server_config(apr_pool_t *p, server_rec *s);
void *gateway_merge_server_config(apr_pool_t *p, void *base, void *add);
void *gateway_create_dir_config(apr_pool_t *p, char *dir);
void *gateway_merge_dir_config(apr_pool_t *p, void *base, void *add);
const char *gateway_cmd_script_alias(cmd_parms *cmd, void *dcfg,
                                     int argc, char *const argv[]);
const char *gateway_cmd_mode(cmd_parms *cmd, void *dcfg,
                             int argc, char *const argv[]);
const char *gateway_cmd_daemon(cmd_parms *cmd, void *dcfg,
                               int argc, char *const argv[]);
const char *gateway_cmd_python_home(cmd_parms *cmd, void *dcfg, const char *dir);
const char *gateway_cmd_python_path(cmd_parms *cmd, void *dcfg, const char *path);
const char *gateway_cmd_shared_interpreter(cmd_parms *cmd, void *dcfg, int on);
const char *gateway_cmd_preload(cmd_parms *cmd, void *dcfg, int on);
const char *gateway_cmd_slow_request(cmd_parms *cmd, void *dcfg, const char *value);
const char *gateway_cmd_status_counters(cmd_parms *cmd, void *dcfg, int on);

/* src/apache/hooks.rs: hooks */
int gateway_pre_config(apr_pool_t *pconf, apr_pool_t *plog, apr_pool_t *ptemp);
int gateway_check_config(apr_pool_t *pconf, apr_pool_t *plog,
                         apr_pool_t *ptemp, server_rec *s);
int gateway_post_config(apr_pool_t *pconf, apr_pool_t *plog,
                        apr_pool_t *ptemp, server_rec *s);
void gateway_child_init(apr_pool_t *pchild, server_rec *s);
void gateway_child_stopping(apr_pool_t *pchild, int graceful);
int gateway_monitor(apr_pool_t *p, server_rec *s);
int gateway_translate_name(request_rec *r);
int gateway_handler(request_rec *r);

#endif /* MOD_GATEWAY_H */

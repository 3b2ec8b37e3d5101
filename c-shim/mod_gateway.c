/*
 * mod_gateway: the Apache httpd 2.4 side of Gateway.
 *
 * This file holds what only C does well here: the module record, the directive
 * table, hook registration, and the few helpers built from APR macros. Everything
 * else (configuration, the environ, running the WSGI application) is Rust, in
 * src/apache/. mod_gateway.h declares the functions each side calls of the other.
 */

#include "httpd.h"
#include "http_config.h"
#include "http_core.h"
#include "http_log.h"
#include "http_protocol.h"
#include "http_request.h"
#include "mpm_common.h"
#include "ap_listen.h"
#include "apr_portable.h"

#include <pthread.h>
#include <unistd.h>
#include "apr_buckets.h"

#include "mod_gateway.h"

module AP_MODULE_DECLARE_DATA gateway_module;
APLOG_USE_MODULE(gateway);

static const command_rec gateway_cmds[] = {
    AP_INIT_TAKE_ARGV("GatewayScriptAlias", gateway_cmd_script_alias, NULL, RSRC_CONF,
                      "URL-PATH FILE[:CALLABLE] [interface=wsgi|asgi]: mount a WSGI or ASGI application"),
    AP_INIT_TAKE_ARGV("GatewayMode", gateway_cmd_mode, NULL, RSRC_CONF | ACCESS_CONF,
                      "'embedded' or 'daemon NAME': where requests run"),
    AP_INIT_TAKE_ARGV("GatewayDaemon", gateway_cmd_daemon, NULL, RSRC_CONF,
                      "NAME [key=value ...]: define a daemon process group"),
    AP_INIT_TAKE1("GatewayPythonHome", gateway_cmd_python_home, NULL, RSRC_CONF,
                  "DIR: virtualenv or prefix of the embedded interpreter"),
    AP_INIT_TAKE1("GatewayPythonPath", gateway_cmd_python_path, NULL, RSRC_CONF,
                  "DIR[:DIR...]: extra sys.path entries for the embedded interpreter"),
    AP_INIT_FLAG("GatewaySharedInterpreter", gateway_cmd_shared_interpreter, NULL, RSRC_CONF,
                 "On: embedded applications of different scripts may share the interpreter"),
    AP_INIT_FLAG("GatewayPreload", gateway_cmd_preload, NULL, RSRC_CONF,
                 "On: each child imports the embedded applications when it starts"),
    AP_INIT_TAKE1("GatewaySlowRequest", gateway_cmd_slow_request, NULL, RSRC_CONF,
                  "SECONDS: log the Python stack of an embedded request still running after this long"),
    AP_INIT_FLAG("GatewayStatusCounters", gateway_cmd_status_counters, NULL, RSRC_CONF,
                 "Off: count no requests for the status page (default On)"),
    {NULL}
};

/* Log one line to the error log of r (if any) or s, tagged with this module. */
void gateway_ap_log(const server_rec *s, const request_rec *r, int level,
                    const char *msg)
{
    if (r != NULL)
        ap_log_rerror(APLOG_MARK, level, 0, r, "%s", msg);
    else
        ap_log_error(APLOG_MARK, level, 0, s, "%s", msg);
}

/* The module's slot in a configuration vector. */
int gateway_ap_module_index(void)
{
    return gateway_module.module_index;
}

/* The request's output brigade, made on first use and reused for every pass. */
static apr_bucket_brigade *request_brigade(request_rec *r, apr_bucket_brigade **bbp)
{
    if (*bbp == NULL)
        *bbp = apr_brigade_create(r->pool, r->connection->bucket_alloc);
    return *bbp;
}

/* Pass a filled brigade down the output filters; a client that left is an error. */
static apr_status_t pass_brigade(request_rec *r, apr_bucket_brigade *bb)
{
    apr_status_t rv = ap_pass_brigade(r->output_filters, bb);

    apr_brigade_cleanup(bb);
    if (rv == APR_SUCCESS && r->connection->aborted)
        rv = APR_ECONNABORTED;
    return rv;
}

/*
 * Write a block and optionally flush it: a transient bucket avoids a copy, the
 * flush bucket pushes it to the client now.
 */
apr_status_t gateway_ap_write(request_rec *r, apr_bucket_brigade **bbp,
                              const char *data, apr_size_t len, int flush)
{
    apr_bucket_alloc_t *ba = r->connection->bucket_alloc;
    apr_bucket_brigade *bb = request_brigade(r, bbp);

    if (len > 0)
        APR_BRIGADE_INSERT_TAIL(bb, apr_bucket_transient_create(data, len, ba));
    if (flush)
        APR_BRIGADE_INSERT_TAIL(bb, apr_bucket_flush_create(ba));
    return pass_brigade(r, bb);
}

/* Send len bytes of an open file from offset through the core's sendfile path. */
apr_status_t gateway_ap_send_file(request_rec *r, apr_bucket_brigade **bbp,
                                  apr_file_t *file, apr_off_t offset, apr_size_t len)
{
    apr_bucket_brigade *bb = request_brigade(r, bbp);

    apr_brigade_insert_file(bb, file, offset, len, r->pool);
    /* The application closes its file when we return: send it all now. */
    APR_BRIGADE_INSERT_TAIL(bb, apr_bucket_flush_create(r->connection->bucket_alloc));
    return pass_brigade(r, bb);
}

/*
 * End a complete response and push it out before the handler returns: httpd looks
 * for the client's next request right after, and when it is already there serves
 * it on this thread instead of handing the connection back to the MPM's listener.
 */
apr_status_t gateway_ap_finish(request_rec *r)
{
    apr_bucket_alloc_t *ba = r->connection->bucket_alloc;
    apr_bucket_brigade *bb = apr_brigade_create(r->pool, ba);

    APR_BRIGADE_INSERT_TAIL(bb, apr_bucket_eos_create(ba));
    APR_BRIGADE_INSERT_TAIL(bb, apr_bucket_flush_create(ba));
    return pass_brigade(r, bb);
}

/*
 * End a response that broke after its headers were sent: the error bucket tells
 * the chunk filter to omit the last-chunk and the connection to close, so the
 * client sees a truncated response instead of a complete-looking one.
 */
void gateway_ap_abort_response(request_rec *r)
{
    conn_rec *c = r->connection;
    apr_bucket_brigade *bb = apr_brigade_create(r->pool, c->bucket_alloc);

    APR_BRIGADE_INSERT_TAIL(bb, ap_bucket_error_create(HTTP_BAD_GATEWAY, NULL,
                                                       r->pool, c->bucket_alloc));
    APR_BRIGADE_INSERT_TAIL(bb, apr_bucket_eos_create(c->bucket_alloc));
    ap_pass_brigade(r->output_filters, bb);
    c->keepalive = AP_CONN_CLOSE;
}

/* A child that an application forks without exec must not keep the listening
 * sockets: it would hold the port after httpd stops. (They are close-on-exec.) */
static void gateway_close_listeners(void)
{
    ap_listen_rec *lr;
    apr_os_sock_t fd;

    for (lr = ap_listeners; lr != NULL; lr = lr->next) {
        if (lr->sd != NULL && apr_os_sock_get(&fd, lr->sd) == APR_SUCCESS && fd >= 0) {
            close(fd);
        }
    }
}

int gateway_ap_client_fd(request_rec *r)
{
    apr_socket_t *sock;
    apr_os_sock_t fd;

    if (r->connection->master != NULL) {
        return -1;
    }
    sock = ap_get_conn_socket(r->connection);
    if (sock == NULL || apr_os_sock_get(&fd, sock) != APR_SUCCESS) {
        return -1;
    }
    return fd;
}

void gateway_ap_close_listeners_at_fork(void)
{
    pthread_atfork(NULL, NULL, gateway_close_listeners);
}

static void gateway_register_hooks(apr_pool_t *p)
{
    /* After mod_alias, as mod_wsgi: an Alias (say /static/ beside an application
     * mounted at /) serves its files; GatewayScriptAlias takes the rest. */
    static const char *const after_alias[] = {"mod_alias.c", NULL};

    ap_hook_pre_config(gateway_pre_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_check_config(gateway_check_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_post_config(gateway_post_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_child_init(gateway_child_init, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_child_stopping(gateway_child_stopping, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_monitor(gateway_monitor, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_translate_name(gateway_translate_name, after_alias, NULL, APR_HOOK_MIDDLE);
    ap_hook_handler(gateway_handler, NULL, NULL, APR_HOOK_MIDDLE);
}

module AP_MODULE_DECLARE_DATA gateway_module = {
    STANDARD20_MODULE_STUFF,
    gateway_create_dir_config,
    gateway_merge_dir_config,
    gateway_create_server_config,
    gateway_merge_server_config,
    gateway_cmds,
    gateway_register_hooks
};

/*
 * ngx_http_gateway_module: the nginx side of Gateway.
 *
 * This file holds what only C does well here: the module and its context, the
 * directive table, the phase handlers nginx calls, and small helpers built from
 * nginx macros. Everything else (configuration values, the environ, the Python
 * threads, the response) is Rust, in src/nginx/. ngx_http_gateway_module.h
 * declares the functions each side calls of the other.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_gateway_module.h"

static char *ngx_http_gateway_app(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_gateway_mode(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_gateway_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_gateway_status_handler(ngx_http_request_t *r);
static char *ngx_http_gateway_init_main_conf(ngx_conf_t *cf, void *conf);
static char *ngx_http_gateway_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_gateway_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_gateway_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_gateway_init_process(ngx_cycle_t *cycle);
static void ngx_http_gateway_exit_process(ngx_cycle_t *cycle);

static ngx_command_t  ngx_http_gateway_commands[] = {

    { ngx_string("gateway_app"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_gateway_app,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_mode"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_gateway_mode,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_daemon"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      gateway_conf_daemon,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_python_home"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      gateway_conf_python_home,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_python_path"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      gateway_conf_python_path,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_threads"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      gateway_conf_threads,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_shared_interpreter"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      gateway_conf_shared_interpreter,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_preload"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      gateway_conf_preload,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_slow_request"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      gateway_conf_slow_request,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_status_counters"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      gateway_conf_status_counters,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gateway_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_gateway_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_gateway_module_ctx = {
    NULL,                                  /* preconfiguration */
    NULL,                                  /* postconfiguration */

    gateway_create_main_conf,              /* create main configuration */
    ngx_http_gateway_init_main_conf,       /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    gateway_create_loc_conf,               /* create location configuration */
    ngx_http_gateway_merge_loc_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_gateway_module = {
    NGX_MODULE_V1,
    &ngx_http_gateway_module_ctx,          /* module context */
    ngx_http_gateway_commands,             /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_gateway_init_module,          /* init module */
    ngx_http_gateway_init_process,         /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_gateway_exit_process,         /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* gateway_app: the location's content handler becomes the gateway's. */
static char *
ngx_http_gateway_app(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char                      *rv;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    rv = gateway_conf_app(cf, conf,
                          ngx_http_conf_get_module_main_conf(cf, ngx_http_gateway_module),
                          clcf);
    if (rv == NGX_CONF_OK) {
        clcf->handler = ngx_http_gateway_handler;
    }

    return rv;
}


/* gateway_status: the location's content handler becomes the status page. */
static char *
ngx_http_gateway_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_gateway_status_handler;

    return NGX_CONF_OK;
}


/* The status page: no body to read, answered at once on the event loop. */
static ngx_int_t
ngx_http_gateway_status_handler(ngx_http_request_t *r)
{
    ngx_int_t  rc;

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    return gateway_status_request(r);
}


/* gateway_mode: records the mode (and which daemon groups are named). */
static char *
ngx_http_gateway_mode(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    return gateway_conf_mode(cf, conf,
               ngx_http_conf_get_module_main_conf(cf, ngx_http_gateway_module));
}


/* End of the http block: check the daemon groups (for nginx -t and reloads). */
static char *
ngx_http_gateway_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_core_conf_t  *ccf;

    ccf = (ngx_core_conf_t *) ngx_get_conf(cf->cycle->conf_ctx, ngx_core_module);

    return gateway_init_main_conf(cf, conf, ccf->user, ccf->group);
}


static char *
ngx_http_gateway_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    return gateway_merge_loc_conf(cf, parent, child,
               ngx_http_conf_get_module_main_conf(cf, ngx_http_gateway_module));
}


/*
 * Runs in the master at start and on each reload (and for nginx -t and -s):
 * starts this configuration's daemon supervisor before the workers fork.
 */
static ngx_int_t
ngx_http_gateway_init_module(ngx_cycle_t *cycle)
{
    ngx_core_conf_t  *ccf;

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    return gateway_init_module(cycle,
               ngx_http_cycle_get_module_main_conf(cycle, ngx_http_gateway_module),
               ngx_test_config || ngx_process == NGX_PROCESS_SIGNALLER,
               ccf->user, ccf->group, &ccf->pid,
               ccf->master ? ccf->worker_processes : 1,
               ccf->daemon && !ngx_daemonized && !ngx_inherited
               && ngx_process == NGX_PROCESS_SINGLE);
}


/* Content phase: hand the request to the Python threads. */
static ngx_int_t
ngx_http_gateway_handler(ngx_http_request_t *r)
{
    return gateway_handle_request(r,
               ngx_http_get_module_loc_conf(r, ngx_http_gateway_module));
}


/* Worker start: Python and its threads start here, never in the master. */
static ngx_int_t
ngx_http_gateway_init_process(ngx_cycle_t *cycle)
{
    ngx_core_conf_t  *ccf;

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    return gateway_init_process(cycle,
               ngx_http_cycle_get_module_main_conf(cycle, ngx_http_gateway_module),
               ccf->master ? ccf->worker_processes : 1);
}


static void
ngx_http_gateway_exit_process(ngx_cycle_t *cycle)
{
    gateway_exit_process(cycle);
}


/* Helpers for Rust, made of nginx macros. */

ngx_int_t
gateway_ngx_send_whole(ngx_http_request_t *r, ngx_uint_t status,
    const u_char *content_type, size_t type_len, const u_char *data, size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    r->headers_out.status = status;
    r->headers_out.content_length_n = len;
    r->headers_out.content_type.len = type_len;
    r->headers_out.content_type.data = ngx_pnalloc(r->pool, type_len);
    if (r->headers_out.content_type.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    ngx_memcpy(r->headers_out.content_type.data, content_type, type_len);
    r->headers_out.content_type_len = type_len;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_create_temp_buf(r->pool, len > 0 ? len : 1);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    b->last = ngx_cpymem(b->pos, data, len);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}

void
gateway_ngx_log(ngx_log_t *log, ngx_uint_t level, const char *msg)
{
    ngx_log_error(level, log, 0, "%s", msg);
}


void *
gateway_ngx_get_ctx(ngx_http_request_t *r)
{
    return ngx_http_get_module_ctx(r, ngx_http_gateway_module);
}


void
gateway_ngx_set_ctx(ngx_http_request_t *r, void *ctx)
{
    ngx_http_set_ctx(r, ctx, ngx_http_gateway_module);
}


ngx_http_core_loc_conf_t *
gateway_ngx_core_loc_conf(ngx_http_request_t *r)
{
    return ngx_http_get_module_loc_conf(r, ngx_http_core_module);
}


ngx_http_core_srv_conf_t *
gateway_ngx_core_srv_conf(ngx_http_request_t *r)
{
    return ngx_http_get_module_srv_conf(r, ngx_http_core_module);
}


void
gateway_ngx_add_timer(ngx_event_t *ev, ngx_msec_t ms)
{
    ngx_add_timer(ev, ms);
}


void
gateway_ngx_del_timer(ngx_event_t *ev)
{
    if (ev->timer_set) {
        ngx_del_timer(ev);
    }
}


/* Watch fd (an eventfd) for reading, level-triggered, as a connection of its own. */
ngx_connection_t *
gateway_ngx_watch_fd(ngx_cycle_t *cycle, ngx_fd_t fd, ngx_event_handler_pt handler)
{
    ngx_connection_t  *c;

    c = ngx_get_connection(fd, cycle->log);
    if (c == NULL) {
        return NULL;
    }

    c->read->handler = handler;
    c->read->log = cycle->log;

    if (ngx_add_event(c->read, NGX_READ_EVENT, 0) != NGX_OK) {
        ngx_free_connection(c);
        return NULL;
    }

    return c;
}


/* The links of a request body chain this module has copied out: nginx reuses them. */
void
gateway_ngx_free_chain(ngx_pool_t *pool, ngx_chain_t *cl)
{
    ngx_chain_t  *ln;

    while (cl) {
        ln = cl;
        cl = cl->next;
        ngx_free_chain(pool, ln);
    }
}

//! The task a server thread drives, for those that watch requests from
//! outside (a daemon's request-timeout and slow-request): its stack, and its
//! cancellation. The thread that asks holds no GIL: the loop answers.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;
use pyo3::prelude::*;

use super::channel;
use super::event_loop::{self, Event};

/// The request each driving thread serves, by thread.
static DRIVERS: LazyLock<Mutex<HashMap<libc::pthread_t, u64>>> = LazyLock::new(Default::default);

/// How long a caller waits for the loop to format a stack.
const STACK_WAIT: Duration = Duration::from_secs(2);

fn drivers() -> std::sync::MutexGuard<'static, HashMap<libc::pthread_t, u64>> {
    DRIVERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks this thread as driving request `id` until dropped.
pub struct Driving(libc::pthread_t);

impl Driving {
    pub fn enter(id: u64) -> Driving {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        drivers().insert(me, id);
        Driving(me)
    }
}

impl Drop for Driving {
    fn drop(&mut self) {
        drivers().remove(&self.0);
    }
}

/// The stack of the ASGI task `thread` drives, if it drives one.
pub fn stack(thread: libc::pthread_t) -> Option<String> {
    let id = *drivers().get(&thread)?;
    Some(stack_of_request(id))
}

/// The stack of ASGI request `id`'s task, or why it cannot be had.
pub fn stack_of_request(id: u64) -> String {
    let Ok(shared) = event_loop::get() else {
        return "(the ASGI event loop is not running)".into();
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    shared.post(Event::Stack(id, tx));
    rx.recv_timeout(STACK_WAIT).unwrap_or_else(|_| {
        format!(
            "(the ASGI event loop did not answer within {}s: something blocks it, \
             maybe this request's own code calling a blocking function)",
            STACK_WAIT.as_secs()
        )
    })
}

/// Cancels the ASGI task `thread` drives; false when it drives none.
pub fn cancel(thread: libc::pthread_t) -> bool {
    let Some(id) = drivers().get(&thread).copied() else {
        return false;
    };
    match event_loop::get() {
        Ok(shared) => {
            shared.post(Event::Cancel(id));
            true
        }
        Err(_) => false,
    }
}

/// On the loop: formats request `id`'s task stack for whoever asked.
pub fn on_stack(py: Python<'_>, id: u64, answer: Sender<String>) {
    let stack = channel::task_of(py, id).map(|task| {
        super::glue(py, "task_stack")
            .and_then(|f| f.bind(py).call1((task,))?.extract::<String>())
            .unwrap_or_else(|e| format!("(cannot read the task's stack: {e})"))
    });
    let _ = answer.send(stack.unwrap_or_else(|| "(the request's task has ended)".into()));
}

/// On the loop: cancels request `id`'s task, if it still runs.
pub fn on_cancel(py: Python<'_>, id: u64) {
    if let Some(task) = channel::task_of(py, id) {
        let _ = task.bind(py).call_method0("cancel");
    }
}

//! The control API's handler: carries `ApiRequest`s out on the live `Machine` and maps
//! the outcome to HTTP statuses (4xx for requests that cannot be honoured as asked,
//! 500 for failures of the VMM itself).

use std::sync::{Arc, Mutex};

use serde_json::json;

use super::machine::Machine;
use super::update::UpdateError;
use super::VmmError;
use crate::api::{ApiHandler, ApiRequest, ApiResponse};
use crate::devices::bus::lock;

pub struct MachineApi {
    machine: Arc<Mutex<Machine>>,
}

impl MachineApi {
    pub fn new(machine: Arc<Mutex<Machine>>) -> Self {
        MachineApi { machine }
    }
}

/// The status for a failed operation: the caller's fault or ours.
fn status_for(e: &VmmError) -> u16 {
    match e {
        VmmError::SnapshotDir { .. } | VmmError::NotPaused => 400,
        // A device that cannot be handed over (a deleted tap): the VM's state, not the
        // request, is the problem.
        VmmError::Virtio(crate::vmm::virtio::VirtioError::Net(_)) => 409,
        VmmError::Update(UpdateError::NotExecutable { .. } | UpdateError::NotWaterbear { .. }) => {
            400
        }
        _ => 500,
    }
}

fn failure(what: &str, e: &VmmError) -> ApiResponse {
    let mut msg = format!("{what} failed: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    log::error!("{msg}");
    ApiResponse::error(status_for(e), msg)
}

impl ApiHandler for MachineApi {
    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        let mut m = lock(&self.machine);
        match req {
            ApiRequest::Info => ApiResponse::ok(m.info()),
            ApiRequest::Pause => match m.pause() {
                Ok(d) => ApiResponse::ok(json!({"state": "paused", "pause_ms": ms(d)})),
                Err(e) => failure("pause", &e),
            },
            ApiRequest::Resume => match m.resume() {
                Ok(d) => ApiResponse::ok(json!({"state": "running", "resume_ms": ms(d)})),
                Err(e) => failure("resume", &e),
            },
            ApiRequest::Snapshot { dir, keep_paused } => match m.snapshot(&dir, keep_paused) {
                Ok(report) => ApiResponse::ok(serde_json::to_value(report).unwrap_or_default()),
                Err(e) => failure("snapshot", &e),
            },
            ApiRequest::Update { binary } => match m.request_update(binary) {
                Ok(binary) => ApiResponse {
                    status: 202,
                    body: json!({
                        "state": "updating",
                        "binary": binary,
                        "generation": m.info()["generation"],
                    }),
                },
                Err(e) => failure("update", &e),
            },
            ApiRequest::Shutdown => {
                m.request_shutdown();
                ApiResponse::ok(json!({"state": "shutting down"}))
            }
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

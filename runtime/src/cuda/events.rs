//! Op times on the device's own clock: CUDA events recorded on the stream between the ops of
//! a run that does not wait for the device ([`crate::Program::run_device_timed`]).
//!
//! An event is recorded before the first node and after each one; a node is charged the span
//! between the events around it. The events are created before the run, so that the host's
//! share of the clock is the record alone. That span is its kernels' time plus any time the device sat
//! idle waiting for the host to issue them (a host loop, a sync point, dispatch slower than the
//! kernels), so the spans add up to the run's time on the device, and where the host is the
//! bottleneck it shows on the nodes that wait for it.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream};
use candle_core::Device;

use crate::error::RuntimeError;

fn fail(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::DeviceClock(format!("{what}: {e}"))
}

/// The events of one run: the start, then one recorded after each node.
pub struct DeviceClock {
    stream: Arc<CudaStream>,
    start: CudaEvent,
    /// Created, not yet recorded.
    spare: Vec<CudaEvent>,
    marks: Vec<CudaEvent>,
}

impl DeviceClock {
    /// Creates the events for `nodes` nodes and records the start event on `device`'s stream;
    /// `None` for a device other than a GPU.
    pub fn start(device: &Device, nodes: usize) -> Result<Option<DeviceClock>, RuntimeError> {
        let Ok(dev) = device.as_cuda_device() else {
            return Ok(None);
        };
        let stream = dev.cuda_stream();
        let spare = (0..nodes).map(|_| new_event(&stream)).collect::<Result<Vec<_>, _>>()?;
        let start = new_event(&stream)?;
        start.record(&stream).map_err(|e| fail("recording an event", e))?;
        Ok(Some(DeviceClock {
            stream,
            start,
            spare,
            marks: Vec::with_capacity(nodes),
        }))
    }

    /// Ends the span of the node just issued.
    pub fn mark(&mut self) -> Result<(), RuntimeError> {
        let event = match self.spare.pop() {
            Some(e) => e,
            None => new_event(&self.stream)?,
        };
        event.record(&self.stream).map_err(|e| fail("recording an event", e))?;
        self.marks.push(event);
        Ok(())
    }

    /// Waits for the device, then gives each marked node's span (seconds), in marking order.
    pub fn spans(self) -> Result<Vec<f64>, RuntimeError> {
        let mut spans = Vec::with_capacity(self.marks.len());
        let mut previous = &self.start;
        for event in &self.marks {
            let ms = previous.elapsed_ms(event).map_err(|e| fail("reading an event", e))?;
            spans.push(f64::from(ms) * 1e-3);
            previous = event;
        }
        Ok(spans)
    }
}

/// A timing event in `stream`'s context, not recorded.
fn new_event(stream: &Arc<CudaStream>) -> Result<CudaEvent, RuntimeError> {
    stream
        .context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| fail("creating an event", e))
}

//! Recording fakes of the installer's host effects, for tests: one [`Recorder`] sees every
//! systemctl call, label and socket probe in the order they happened.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::{Clock, CriProbe, Host, HostSystem, InstallError, NodeLabeler, Outcome, Systemctl};

/// One effect the installer had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Systemctl(Systemctl),
    /// `Some(ready)`: the label set; `None`: removed.
    Label(Option<bool>),
    Probe(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Event>>>);

impl Recorder {
    fn push(&self, event: Event) {
        if let Ok(mut events) = self.0.lock() {
            events.push(event);
        }
    }

    /// The events so far, and a fresh start.
    pub fn take(&self) -> Vec<Event> {
        self.0
            .lock()
            .map(|mut events| std::mem::take(&mut *events))
            .unwrap_or_default()
    }
}

/// systemd that remembers which units are active and enabled. A call in `failing` fails.
#[derive(Debug, Default)]
pub struct FakeSystemd {
    recorder: Recorder,
    active: Mutex<HashSet<String>>,
    enabled: Mutex<HashSet<String>>,
    pub failing: Mutex<Vec<Systemctl>>,
}

impl HostSystem for FakeSystemd {
    fn systemctl(&self, call: &Systemctl) -> Result<Outcome, InstallError> {
        self.recorder.push(Event::Systemctl(call.clone()));
        if self.failing.lock().is_ok_and(|f| f.contains(call)) {
            return Ok(Outcome {
                success: false,
                detail: "failed (fake)".to_owned(),
            });
        }
        let (Ok(mut active), Ok(mut enabled)) = (self.active.lock(), self.enabled.lock()) else {
            return Ok(Outcome::ok());
        };
        let success = match call {
            Systemctl::DaemonReload => true,
            Systemctl::Enable(unit) => {
                enabled.insert(unit.clone());
                true
            }
            Systemctl::Disable(unit) => {
                enabled.remove(unit);
                true
            }
            Systemctl::Restart(unit) => {
                active.insert(unit.clone());
                true
            }
            Systemctl::Reload(_) => true,
            Systemctl::Stop(unit) => {
                active.remove(unit);
                true
            }
            Systemctl::IsActive(unit) => active.contains(unit),
            Systemctl::IsEnabled(unit) => enabled.contains(unit),
        };
        Ok(Outcome {
            success,
            detail: if success {
                String::new()
            } else {
                "inactive".to_owned()
            },
        })
    }
}

impl FakeSystemd {
    /// Marks a unit inactive, as a crash would.
    pub fn crash(&self, unit: &str) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(unit);
        }
    }
}

#[derive(Debug, Default)]
pub struct FakeLabeler {
    recorder: Recorder,
}

impl NodeLabeler for FakeLabeler {
    fn set_ready(&self, ready: Option<bool>) -> BoxFuture<'_, Result<(), InstallError>> {
        self.recorder.push(Event::Label(ready));
        Box::pin(async { Ok(()) })
    }
}

/// Answers from `script` first, then `Ok("fake-runtime 1.0")` (or the error in `down`).
#[derive(Debug, Default)]
pub struct FakeProbe {
    recorder: Recorder,
    pub script: Mutex<VecDeque<Result<String, String>>>,
    pub down: Mutex<Option<String>>,
}

impl CriProbe for FakeProbe {
    fn version<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<String, String>> {
        self.recorder.push(Event::Probe(socket.to_owned()));
        let scripted = self.script.lock().ok().and_then(|mut s| s.pop_front());
        let down = self.down.lock().ok().and_then(|d| d.clone());
        Box::pin(async move {
            match (scripted, down) {
                (Some(answer), _) => answer,
                (None, Some(err)) => Err(err),
                (None, None) => Ok("fake-runtime 1.0".to_owned()),
            }
        })
    }
}

/// Time that passes only when slept.
#[derive(Debug)]
pub struct FakeClock {
    start: Instant,
    elapsed: Mutex<Duration>,
}

impl Default for FakeClock {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed.lock().map(|e| *e).unwrap_or_default()
    }
    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        if let Ok(mut elapsed) = self.elapsed.lock() {
            *elapsed += duration;
        }
        Box::pin(tokio::task::yield_now())
    }
}

/// Every fake, sharing one recorder.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub recorder: Recorder,
    pub systemd: FakeSystemd,
    pub labeler: FakeLabeler,
    pub probe: FakeProbe,
    pub clock: FakeClock,
}

impl FakeHost {
    pub fn new() -> Self {
        let recorder = Recorder::default();
        Self {
            systemd: FakeSystemd {
                recorder: recorder.clone(),
                ..FakeSystemd::default()
            },
            labeler: FakeLabeler {
                recorder: recorder.clone(),
            },
            probe: FakeProbe {
                recorder: recorder.clone(),
                ..FakeProbe::default()
            },
            clock: FakeClock::default(),
            recorder,
        }
    }

    pub fn host(&self) -> Host<'_> {
        Host {
            systemd: &self.systemd,
            labeler: &self.labeler,
            probe: &self.probe,
            clock: &self.clock,
        }
    }
}

use std::time::Duration;

use serde_json::json;

use super::*;

/// A job body that does `steps` units of work, 10 ms each, with a pause point and a
/// cancel check between units, and fails at step `fail_at` if set.
struct Steps {
    steps: u64,
    fail_at: Option<u64>,
}

#[async_trait]
impl JobDriver for Steps {
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure> {
        job.progress_meter().set_total(self.steps);
        for step in 0..self.steps {
            job.pause_point().await;
            if job.is_cancelled() {
                return Err(JobFailure::Cancelled);
            }
            if self.fail_at == Some(step) {
                return Err(JobFailure::Failed("Input/output error".into()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            job.progress_meter().add_done(1);
        }
        Ok(())
    }
}

fn names(events: &[JobEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            JobEvent::StatusChange { status, .. } => status.as_str().to_string(),
            other => other.name().to_string(),
        })
        .collect()
}

async fn collect_until(rx: &mut broadcast::Receiver<JobEvent>, last: JobStatus) -> Vec<JobEvent> {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let done = matches!(&event, JobEvent::StatusChange { status, .. } if *status == last);
        events.push(event);
        if done {
            return events;
        }
    }
}

async fn wait_status(job: &Job, status: JobStatus) {
    for _ in 0..1000 {
        if job.status() == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("job never reached {status:?}, is {:?}", job.status());
}

#[test]
fn verb_table_matches_qemu() {
    use JobStatus::*;
    assert!(JobVerb::Cancel.allowed_in(Pending));
    assert!(!JobVerb::Cancel.allowed_in(Concluded));
    assert!(JobVerb::Pause.allowed_in(Created));
    assert!(!JobVerb::Pause.allowed_in(Waiting));
    assert!(JobVerb::Finalize.allowed_in(Pending));
    assert!(!JobVerb::Finalize.allowed_in(Running));
    assert!(JobVerb::Dismiss.allowed_in(Concluded));
    assert!(!JobVerb::Complete.allowed_in(Running));
    assert!(Created.can_become(Null));
    assert!(!Running.can_become(Pending));
    assert!(Aborting.can_become(Aborting));
    assert!(!Concluded.can_become(Running));
}

#[test]
fn events_carry_qemus_payloads() {
    let completed = JobEvent::Completed {
        job_type: JobType::Backup,
        device: "j".into(),
        len: 10,
        offset: 4,
        speed: 0,
        error: Some("Input/output error".into()),
    };
    assert_eq!(completed.name(), "BLOCK_JOB_COMPLETED");
    assert_eq!(
        completed.data(),
        json!({"type":"backup","device":"j","len":10,"offset":4,"speed":0,"error":"Input/output error"})
    );
    let error = JobEvent::Error {
        device: "j".into(),
        operation: IoOperation::Write,
        action: ErrorAction::Stop,
    };
    assert_eq!(
        error.data(),
        json!({"device":"j","operation":"write","action":"stop"})
    );
    let status = JobEvent::StatusChange {
        id: "j".into(),
        status: JobStatus::Concluded,
    };
    assert_eq!(status.data(), json!({"id":"j","status":"concluded"}));
}

#[tokio::test]
async fn a_successful_job_walks_qemus_states_and_disappears() {
    let registry = JobRegistry::new();
    let mut rx = registry.subscribe();
    let job = registry
        .create("job0", JobType::Backup, JobOptions::default())
        .unwrap();
    job.start(Arc::new(Steps {
        steps: 3,
        fail_at: None,
    }));
    let events = collect_until(&mut rx, JobStatus::Null).await;
    assert_eq!(
        names(&events),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        events[4].data(),
        json!({"type":"backup","device":"job0","len":3,"offset":3,"speed":0})
    );
    assert!(registry.get("job0").is_none());
}

#[tokio::test]
async fn manual_finalize_and_dismiss() {
    let registry = JobRegistry::new();
    let mut rx = registry.subscribe();
    let options = JobOptions {
        auto_finalize: false,
        auto_dismiss: false,
        speed: 0,
    };
    let job = registry.create("j1", JobType::Backup, options).unwrap();
    job.start(Arc::new(Steps {
        steps: 2,
        fail_at: None,
    }));
    wait_status(&job, JobStatus::Pending).await;
    assert_eq!(
        job.dismiss().unwrap_err().desc,
        "Job 'j1' in state 'pending' cannot accept command verb 'dismiss'"
    );
    job.finalize().unwrap();
    wait_status(&job, JobStatus::Concluded).await;
    assert_eq!(job.job_info().status, JobStatus::Concluded);
    assert!(
        registry.get("j1").is_some(),
        "concluded jobs stay until dismissed"
    );
    job.dismiss().unwrap();
    let events = collect_until(&mut rx, JobStatus::Null).await;
    assert_eq!(
        names(&events),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert!(registry.get("j1").is_none());
}

#[tokio::test]
async fn pause_parks_the_job_and_resume_continues() {
    let registry = JobRegistry::new();
    let job = registry
        .create("p", JobType::Backup, JobOptions::default())
        .unwrap();
    job.start(Arc::new(Steps {
        steps: 30,
        fail_at: None,
    }));
    wait_status(&job, JobStatus::Running).await;
    job.pause().unwrap();
    assert_eq!(job.pause().unwrap_err().desc, "Job is already paused");
    wait_status(&job, JobStatus::Paused).await;
    let frozen = job.progress();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(job.progress(), frozen, "no progress while paused");
    assert!(job.block_job_info().paused);
    job.resume().unwrap();
    assert_eq!(
        job.resume().unwrap_err().desc,
        "Can't resume a job that was not paused"
    );
    wait_status(&job, JobStatus::Null).await;
    assert_eq!(job.progress(), (30, 30));
}

#[tokio::test]
async fn cancel_ends_with_block_job_cancelled() {
    let registry = JobRegistry::new();
    let mut rx = registry.subscribe();
    let options = JobOptions {
        auto_dismiss: false,
        ..JobOptions::default()
    };
    let job = registry.create("c", JobType::Backup, options).unwrap();
    job.start(Arc::new(Steps {
        steps: 1000,
        fail_at: None,
    }));
    wait_status(&job, JobStatus::Running).await;
    job.pause().unwrap();
    wait_status(&job, JobStatus::Paused).await;
    job.cancel(false).unwrap();
    let events = collect_until(&mut rx, JobStatus::Concluded).await;
    let names = names(&events);
    assert_eq!(
        names[names.len() - 3..],
        ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    );
    assert_eq!(job.job_info().error.as_deref(), Some("Operation canceled"));
    let JobEvent::Cancelled { offset, len, .. } = &events[events.len() - 2] else {
        panic!()
    };
    assert!(offset < len);
    assert_eq!(
        job.cancel(false).unwrap_err().desc,
        "Job 'c' in state 'concluded' cannot accept command verb 'cancel'"
    );
}

#[tokio::test]
async fn failure_reports_the_error_in_block_job_completed() {
    let registry = JobRegistry::new();
    let mut rx = registry.subscribe();
    let job = registry
        .create("f", JobType::Backup, JobOptions::default())
        .unwrap();
    job.start(Arc::new(Steps {
        steps: 10,
        fail_at: Some(2),
    }));
    let events = collect_until(&mut rx, JobStatus::Null).await;
    assert_eq!(
        names(&events),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(
        events[3].data(),
        json!({"type":"backup","device":"f","len":10,"offset":2,"speed":0,"error":"Input/output error"})
    );
}

#[tokio::test]
async fn stop_action_pauses_with_io_status_until_resumed() {
    let registry = JobRegistry::new();
    let mut rx = registry.subscribe();
    let job = registry
        .create("s", JobType::Backup, JobOptions::default())
        .unwrap();
    assert_eq!(
        job.handle_error(ErrorPolicy::Enospc, IoOperation::Write, libc::ENOSPC),
        ErrorAction::Stop
    );
    assert_eq!(job.block_job_info().io_status, IoStatus::Nospace);
    assert!(job.is_user_paused());
    job.resume().unwrap();
    assert_eq!(job.block_job_info().io_status, IoStatus::Ok);
    assert_eq!(
        job.handle_error(ErrorPolicy::Enospc, IoOperation::Write, libc::EIO),
        ErrorAction::Report
    );
    assert_eq!(
        job.handle_error(ErrorPolicy::Auto, IoOperation::Read, libc::EIO),
        ErrorAction::Report
    );
    assert_eq!(
        job.handle_error(ErrorPolicy::Ignore, IoOperation::Read, libc::EIO),
        ErrorAction::Ignore
    );
    let mut errors = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let JobEvent::Error { .. } = event {
            errors.push(event.data());
        }
    }
    assert_eq!(
        errors,
        [
            json!({"device":"s","operation":"write","action":"stop"}),
            json!({"device":"s","operation":"write","action":"report"}),
            json!({"device":"s","operation":"read","action":"report"}),
            json!({"device":"s","operation":"read","action":"ignore"}),
        ]
    );
}

#[tokio::test]
async fn ids_are_checked_like_qemu() {
    let registry = JobRegistry::new();
    assert_eq!(
        registry
            .create("1j", JobType::Backup, JobOptions::default())
            .unwrap_err()
            .desc,
        "Invalid job ID '1j'"
    );
    let job = registry
        .create("j", JobType::Backup, JobOptions::default())
        .unwrap();
    assert_eq!(
        registry
            .create("j", JobType::Backup, JobOptions::default())
            .unwrap_err()
            .desc,
        "Job ID 'j' already in use"
    );
    assert_eq!(
        job.set_speed(-1).unwrap_err().desc,
        "Parameter 'speed' expects a non-negative value"
    );
    job.set_speed(1 << 20).unwrap();
    assert_eq!(job.block_job_info().speed, 1 << 20);
    registry.discard(&job);
    assert!(registry.get("j").is_none());
}

//! End to end: dead, slow and restarted workers, a coordinator killed with SIGKILL and
//! resumed, zero-weight rounds, hostile updates, TLS and a bad token, each with real
//! processes on 127.0.0.1.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Process, read_log, wait_for_port};
use fedcompress_coordinator::Checkpoint;

const MODEL: &str = "synthetic:w=300x200,b=200,s=scalar";

/// A coordinator process plus the paths a test reads afterwards.
struct Cluster {
    dir: PathBuf,
    coordinator: Process,
    address: String,
    port: u16,
    workers: Vec<Process>,
}

fn checkpoints(dir: &Path) -> PathBuf {
    dir.join("checkpoints")
}

fn start_coordinator(dir: &Path, name: &str, extra: &[&str]) -> (Process, u16) {
    let port_file = dir.join(format!("{name}.port"));
    let _ = std::fs::remove_file(&port_file);
    let checkpoint_dir = checkpoints(dir);
    let out = dir.join("out");
    let mut args = vec![
        "coordinator",
        "--port-file",
        port_file.to_str().unwrap(),
        "--model",
        MODEL,
        "--checkpoint-dir",
        checkpoint_dir.to_str().unwrap(),
        "--keep-checkpoints",
        "0",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "5",
        "--lr",
        "0.5",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--listen") {
        args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
    let process = Process::spawn(name, &args, dir);
    let port = wait_for_port(&port_file, Duration::from_secs(30));
    (process, port)
}

fn start_worker(dir: &Path, address: &str, name: &str, client: u32, extra: &[&str]) -> Process {
    let client = client.to_string();
    let mut args = vec![
        "worker",
        "--coordinator",
        address,
        "--name",
        name,
        "--clients",
        &client,
        "--model",
        "synthetic",
        "--seed",
        "5",
    ];
    args.extend_from_slice(extra);
    Process::spawn(name, &args, dir)
}

impl Cluster {
    fn start(dir: &Path, coordinator_args: &[&str]) -> Self {
        let (coordinator, port) = start_coordinator(dir, "coordinator", coordinator_args);
        Self {
            dir: dir.to_path_buf(),
            coordinator,
            address: format!("http://127.0.0.1:{port}"),
            port,
            workers: Vec::new(),
        }
    }

    fn add_worker(&mut self, name: &str, client: u32, extra: &[&str]) {
        let worker = start_worker(&self.dir, &self.address, name, client, extra);
        self.workers.push(worker);
    }

    fn wait_success(&mut self, timeout: Duration) {
        let status = self.coordinator.wait(timeout);
        assert!(
            status.success(),
            "coordinator failed:\n{}",
            read_log(&self.dir, "coordinator")
        );
    }

    fn metrics(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("out/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

fn wait_for_log(dir: &Path, name: &str, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !read_log(dir, name).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "`{needle}` not in the log of {name} within {timeout:?}:\n{}",
            read_log(dir, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn final_params(dir: &Path) -> Vec<f32> {
    Checkpoint::load_latest(&checkpoints(dir)).unwrap().params
}

#[test]
fn worker_killed_mid_round_round_closes_with_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        dir.path(),
        &[
            "--clients",
            "3",
            "--workers",
            "3",
            "--rounds",
            "2",
            "--quorum",
            "2",
            "--heartbeat-timeout-secs",
            "3",
        ],
    );
    cluster.add_worker("worker-0", 0, &[]);
    cluster.add_worker("worker-1", 1, &[]);
    cluster.add_worker("worker-2", 2, &["--train-delay-ms", "60000"]);
    wait_for_log(
        dir.path(),
        "coordinator",
        "round started",
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(500));
    cluster.workers[2].kill();

    cluster.wait_success(Duration::from_secs(60));
    let metrics = cluster.metrics();
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[0]["clients_selected"], 3);
    assert_eq!(metrics[0]["clients_answered"], 2);
    assert_eq!(
        metrics[1]["clients_selected"], 2,
        "a dead worker is not selected again"
    );
    let log = read_log(dir.path(), "coordinator");
    assert!(
        log.contains("dropping its client"),
        "no drop logged:\n{log}"
    );
}

#[test]
fn slow_worker_is_not_taken_for_dead() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        dir.path(),
        &[
            "--clients",
            "2",
            "--workers",
            "2",
            "--rounds",
            "1",
            "--quorum",
            "1",
            "--heartbeat-timeout-secs",
            "3",
        ],
    );
    cluster.add_worker("worker-0", 0, &[]);
    // Training outlasts the heartbeat timeout twice over; heartbeats keep the worker alive.
    cluster.add_worker("worker-1", 1, &["--train-delay-ms", "6500"]);
    cluster.wait_success(Duration::from_secs(60));
    let metrics = cluster.metrics();
    assert_eq!(metrics[0]["clients_answered"], 2);
}

#[test]
fn restarted_worker_rejoins_and_gets_its_task() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        dir.path(),
        &[
            "--clients",
            "2",
            "--workers",
            "2",
            "--rounds",
            "2",
            "--heartbeat-timeout-secs",
            "20",
        ],
    );
    cluster.add_worker("worker-0", 0, &[]);
    cluster.add_worker("worker-1", 1, &["--train-delay-ms", "60000"]);
    wait_for_log(
        dir.path(),
        "worker-1",
        "joined the coordinator",
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_millis(500));
    cluster.workers[1].kill();
    // Same name, no delay: it takes the old place and runs the open round's task.
    let restarted = start_worker(dir.path(), &cluster.address, "worker-1", 1, &[]);
    cluster.workers.push(restarted);

    cluster.wait_success(Duration::from_secs(60));
    let metrics = cluster.metrics();
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[0]["clients_answered"], 2);
    assert_eq!(metrics[1]["clients_answered"], 2);
}

/// Stops the coordinator with `signal` after round 3, resumes it, and checks that the final
/// model equals an uninterrupted run's.
fn resume_after_signal_matches_uninterrupted_run(signal: &str) {
    let rounds = "6";
    let reference_dir = tempfile::tempdir().unwrap();
    let mut reference = Cluster::start(
        reference_dir.path(),
        &["--clients", "2", "--workers", "2", "--rounds", rounds],
    );
    reference.add_worker("worker-0", 0, &[]);
    reference.add_worker("worker-1", 1, &[]);
    reference.wait_success(Duration::from_secs(60));
    let expected = final_params(reference_dir.path());

    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        dir.path(),
        &["--clients", "2", "--workers", "2", "--rounds", rounds],
    );
    cluster.add_worker("worker-0", 0, &["--train-delay-ms", "400"]);
    cluster.add_worker("worker-1", 1, &["--train-delay-ms", "400"]);
    let third = checkpoints(dir.path()).join("round-000003.ckpt");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !third.exists() {
        assert!(Instant::now() < deadline, "round 3 never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    if signal == "KILL" {
        cluster.coordinator.kill();
    } else {
        let pid = cluster.coordinator.pid().to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = cluster.coordinator.wait(Duration::from_secs(60));
        assert!(
            status.success(),
            "SIGTERM should stop the coordinator cleanly"
        );
    }

    let listen = format!("127.0.0.1:{}", cluster.port);
    let checkpoint_dir = checkpoints(dir.path());
    let (mut resumed, _) = start_coordinator(
        dir.path(),
        "resumed",
        &[
            "--listen",
            &listen,
            "--clients",
            "2",
            "--workers",
            "2",
            "--rounds",
            rounds,
            "--resume",
            checkpoint_dir.to_str().unwrap(),
        ],
    );
    let status = resumed.wait(Duration::from_secs(120));
    assert!(
        status.success(),
        "resumed coordinator failed:\n{}",
        read_log(dir.path(), "resumed")
    );
    assert!(read_log(dir.path(), "resumed").contains("resuming from checkpoint"));

    let params = final_params(dir.path());
    assert_eq!(
        Checkpoint::load_latest(&checkpoint_dir)
            .unwrap()
            .header
            .round,
        6
    );
    assert_eq!(params.len(), expected.len());
    assert!(
        params
            .iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the resumed run's model differs from the uninterrupted run's"
    );
}

#[test]
fn coordinator_resumes_after_sigkill_to_same_model() {
    resume_after_signal_matches_uninterrupted_run("KILL");
}

#[test]
fn coordinator_resumes_after_sigterm_to_same_model() {
    resume_after_signal_matches_uninterrupted_run("TERM");
}

#[test]
fn zero_weight_round_is_skipped_without_nan() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        dir.path(),
        &["--clients", "1", "--workers", "1", "--rounds", "2"],
    );
    cluster.add_worker("worker-0", 0, &["--samples", "0"]);
    cluster.wait_success(Duration::from_secs(60));
    let metrics = cluster.metrics();
    assert_eq!(metrics.len(), 2);
    for round in &metrics {
        assert_eq!(round["skipped"], true);
        assert_eq!(round["relative_change"], 0.0);
    }
    let params = final_params(dir.path());
    assert!(
        params.iter().all(|v| *v == 0.0),
        "a skipped round changed the model"
    );
    assert!(
        read_log(dir.path(), "coordinator").contains("total sample weight of the round is zero")
    );
}

/// Makes a CA and a coordinator certificate with the script the README shows.
fn make_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-test-cert.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("bash must be installed");
    assert!(
        status.success(),
        "make-test-cert.sh failed (is openssl installed?)"
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server-key.pem"),
    )
}

#[test]
fn tls_run_succeeds_and_plain_worker_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certificate(&dir.path().join("tls"));
    let (mut coordinator, port) = start_coordinator(
        dir.path(),
        "coordinator",
        &[
            "--clients",
            "1",
            "--workers",
            "1",
            "--rounds",
            "2",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let mut plain = start_worker(
        dir.path(),
        &format!("http://127.0.0.1:{port}"),
        "plain",
        0,
        &["--connect-attempts", "2"],
    );
    let status = plain.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "a worker without TLS joined a TLS coordinator"
    );

    let mut worker = start_worker(
        dir.path(),
        &format!("https://127.0.0.1:{port}"),
        "worker-0",
        0,
        &["--tls-ca", ca.to_str().unwrap()],
    );
    let status = coordinator.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "coordinator failed:\n{}",
        read_log(dir.path(), "coordinator")
    );
    assert!(worker.wait(Duration::from_secs(30)).success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["rounds"], 2);
}

#[test]
fn bad_token_is_rejected_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        dir.path(),
        &[
            "--clients",
            "1",
            "--workers",
            "1",
            "--rounds",
            "1",
            "--token",
            "s3cret",
        ],
    );
    let mut intruder = start_worker(
        dir.path(),
        &cluster.address,
        "intruder",
        0,
        &["--token", "guess"],
    );
    let status = intruder.wait(Duration::from_secs(30));
    assert!(!status.success(), "a worker with a bad token joined");
    let intruder_log = read_log(dir.path(), "intruder");
    assert!(intruder_log.contains("invalid token"), "{intruder_log}");
    wait_for_log(
        dir.path(),
        "coordinator",
        "bad_token",
        Duration::from_secs(10),
    );

    cluster.add_worker("worker-0", 0, &["--token", "s3cret"]);
    cluster.wait_success(Duration::from_secs(60));
}

#[test]
fn missed_quorum_retries_then_stops_with_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(
        dir.path(),
        &[
            "--clients",
            "2",
            "--workers",
            "2",
            "--rounds",
            "3",
            "--quorum",
            "2",
            "--round-timeout-secs",
            "1.5",
        ],
    );
    cluster.add_worker("worker-0", 0, &[]);
    // Alive (it heartbeats) but far slower than the round deadline.
    cluster.add_worker("worker-1", 1, &["--train-delay-ms", "60000"]);
    let status = cluster.coordinator.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "a missed quorum must fail the run");
    let log = read_log(dir.path(), "coordinator");
    assert_eq!(
        log.matches("round missed its quorum; running it again")
            .count(),
        2,
        "expected two retries:\n{log}"
    );
    assert!(
        log.contains("round 1 closed with 1 updates, below the quorum of 2, after 3 attempts"),
        "{log}"
    );
}

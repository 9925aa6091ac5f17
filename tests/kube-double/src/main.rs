//! `kube-double --listen 127.0.0.1:0 --kubeconfig-out PATH [--context NAME]`
//!
//! Runs the Kubernetes API server double as a process, writes a kubeconfig pointing at it and
//! serves until interrupted. Rollout modes and the clock are driven over HTTP:
//! `POST /kube-double/rollout?namespace=NS&deployment=NAME&mode=ImagePullBackOff`,
//! `POST /kube-double/rollout?image=IMAGE&mode=CrashLoop`, `POST /kube-double/advance?seconds=N`,
//! `GET /kube-double/objects?labelSelector=...`.

use std::process::ExitCode;

const USAGE: &str = "usage: kube-double [--listen ADDR] [--kubeconfig-out PATH] [--context NAME]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut listen = "127.0.0.1:0".to_string();
    let mut out: Option<String> = None;
    let mut context = "kube-double".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let r = match a.as_str() {
            "--listen" => value("--listen").map(|v| listen = v),
            "--kubeconfig-out" => value("--kubeconfig-out").map(|v| out = Some(v)),
            "--context" => value("--context").map(|v| context = v),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other:?}")),
        };
        if let Err(e) = r {
            eprintln!("kube-double: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let addr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kube-double: bad --listen address {listen:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let double = match kube_double::KubeDouble::start_on(addr).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kube-double: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &out
        && let Err(e) = std::fs::write(path, double.kubeconfig_yaml(&context))
    {
        eprintln!("kube-double: writing {path}: {e}");
        return ExitCode::FAILURE;
    }
    println!("kube-double listening on {}", double.url());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}

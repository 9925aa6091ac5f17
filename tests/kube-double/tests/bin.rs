//! The standalone binary: a subprocess reached through the kubeconfig it writes.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn binary_serves_and_writes_a_kubeconfig() {
    let dir = std::env::temp_dir().join(format!("kube-double-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kc = dir.join("kubeconfig");
    let _ = std::fs::remove_file(&kc);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-double"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kc)
        .args(["--context", "double"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !kc.exists() && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&kc).map_err(|e| e.to_string())?;
        let opts = kube::config::KubeConfigOptions {
            context: Some("double".into()),
            ..Default::default()
        };
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &opts)
            .await
            .map_err(|e| e.to_string())?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        let nss: Api<Namespace> = Api::all(client);
        let list = nss
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(list.items.len())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(result.unwrap() >= 4, "default namespaces are served");
}

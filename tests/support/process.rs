//! The whole pipeline as five processes, wired together on ephemeral ports (the service
//! processes themselves are `runnel_testkit::process`).

use anyhow::Result;
use runnel_testkit::process::ServiceProcess;
use std::collections::BTreeMap;
use std::path::Path;

/// Partitions of the topics the broker creates on first use. Tests that need an event on
/// every partition pick keys with `runnel_proto::partition_for_key`.
pub const PARTITIONS: u32 = 4;

/// The five services, each its own process, wired together on ephemeral ports.
pub struct Pipeline {
    /// The working directory: config, data directories and logs.
    pub dir: tempfile::TempDir,
    /// The message queue tier.
    pub broker: ServiceProcess,
    /// The storage tier.
    pub store: ServiceProcess,
    /// The collection tier.
    pub collector: ServiceProcess,
    /// The analysis tier.
    pub analyzer: ServiceProcess,
    /// The data access tier.
    pub gateway: ServiceProcess,
}

impl Pipeline {
    /// Starts broker and store, then the services that call them, with `analyzer_toml` as
    /// the `[analyzer]` part of the shared config file.
    pub async fn start(analyzer_toml: &str, env: BTreeMap<String, String>) -> Result<Pipeline> {
        let dir = tempfile::tempdir()?;
        let data = dir.path();
        let base = Self::base_config(data);
        std::fs::write(
            data.join("runnel.toml"),
            format!("{base}\n{analyzer_toml}\n"),
        )?;
        let config = data.join("runnel.toml");
        let broker = ServiceProcess::start("runnel-broker", &config, &env, data).await?;
        let store = ServiceProcess::start("runnel-store", &config, &env, data).await?;
        let wired = |extra: &[(&str, String)]| {
            let mut env = env.clone();
            for (key, value) in extra {
                env.insert((*key).to_owned(), value.clone());
            }
            env
        };
        let collector = ServiceProcess::start(
            "runnel-collector",
            &config,
            &wired(&[
                ("RUNNEL_COLLECTOR__BROKER", broker.url()),
                ("RUNNEL_COLLECTOR__STORE", store.url()),
            ]),
            data,
        )
        .await?;
        let analyzer = ServiceProcess::start(
            "runnel-analyzer",
            &config,
            &wired(&[
                ("RUNNEL_ANALYZER__BROKER", broker.url()),
                ("RUNNEL_ANALYZER__STORE", store.url()),
            ]),
            data,
        )
        .await?;
        let gateway = ServiceProcess::start(
            "runnel-gateway",
            &config,
            // The analyzer says which queries exist.
            &wired(&[
                ("RUNNEL_GATEWAY__STORE", store.url()),
                ("RUNNEL_GATEWAY__PIPELINE__ANALYZER", analyzer.url()),
            ]),
            data,
        )
        .await?;
        Ok(Pipeline {
            dir,
            broker,
            store,
            collector,
            analyzer,
            gateway,
        })
    }

    fn base_config(data: &Path) -> String {
        let d = data.display();
        let server = "[{s}.server]\ngrpc = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndrain_timeout = \"5s\"\n";
        let mut out = format!(
            "[collector]\ndata_dir = \"{d}/collector\"\nudp = \"127.0.0.1:0\"\n[broker]\ndata_dir = \"{d}/broker\"\ndefault_partitions = {PARTITIONS}\n[store]\ndata_dir = \"{d}/store\"\n[analyzer]\ndata_dir = \"{d}/analyzer\"\n[gateway]\nhttp = \"127.0.0.1:0\"\ndata_dir = \"{d}/gateway\"\n"
        );
        for s in ["collector", "broker", "analyzer", "store", "gateway"] {
            out.push_str(&server.replace("{s}", s));
        }
        out
    }

    /// Every service's log, for failure messages.
    pub fn logs(&self) -> String {
        [
            &self.broker,
            &self.store,
            &self.collector,
            &self.analyzer,
            &self.gateway,
        ]
        .iter()
        .map(|p| format!("===== {} =====\n{}", p.name, p.log()))
        .collect::<Vec<_>>()
        .join("\n")
    }
}

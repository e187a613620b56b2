//! The `runnel-broker` binary: the broker service on its own, configured from
//! `runnel.toml` / `RUNNEL_BROKER__…` (see [`runnel_broker::BrokerConfig`]).

fn main() -> std::process::ExitCode {
    runnel_server::main("runnel-broker", runnel_broker::run)
}

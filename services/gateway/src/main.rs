//! The `runnel-gateway` binary: the data access tier as its own process, configured from
//! `runnel.toml` / `RUNNEL_GATEWAY__…` (see [`runnel_gateway::GatewayConfig`]).

fn main() -> std::process::ExitCode {
    runnel_server::main("runnel-gateway", runnel_gateway::run)
}

//! The `runnel-store` binary: the storage tier as its own process, configured from
//! `runnel.toml` / `RUNNEL_STORE__…` (see [`runnel_store::StoreConfig`]).

fn main() -> std::process::ExitCode {
    runnel_server::main("runnel-store", runnel_store::run)
}

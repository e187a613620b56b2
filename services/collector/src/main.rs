//! The `runnel-collector` binary: the collection tier as its own process.

fn main() -> std::process::ExitCode {
    runnel_server::main("runnel-collector", runnel_collector::run)
}

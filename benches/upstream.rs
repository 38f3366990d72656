//! Criterion benchmarks of one request through an upstream `Pool` to the
//! simulated PLC on 127.0.0.1, one caller task at a time on a runtime with
//! two worker threads. With `max_in_flight = 1` the caller exchanges the
//! request on the parked connection itself. With `max_in_flight = 2` every
//! request goes through the connection task's channel, which adds the
//! hand-over between the two tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::events::Emitter;
use sluice::modbus::pdu::Request;
use sluice::modbus::sim::SimPlc;
use sluice::modbus::upstream::{Pool, UpstreamSettings};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn start_sim() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(SimPlc::new().serve(listener));
    address
}

/// Makes `iterations` sequential calls from one task and returns their
/// total time.
fn time_calls(runtime: &Runtime, pool: &Pool, iterations: u64) -> Duration {
    let pool = pool.clone();
    let calls = runtime.spawn(async move {
        let request = Request::ReadHoldingRegisters {
            address: 0,
            quantity: 10,
        };
        let started = Instant::now();
        for _ in 0..iterations {
            pool.call(1, &request).await.expect("response");
        }
        started.elapsed()
    });
    runtime.block_on(calls).unwrap()
}

fn pool_call(criterion: &mut Criterion) {
    let runtime = runtime();
    let address = runtime.block_on(start_sim());
    // Nothing drains the events: the pools emit only `device_up`, so the
    // queue never fills.
    let (emitter, _events) = Emitter::new(Arc::from("bench"));
    let mut group = criterion.benchmark_group("pool_call");
    for max_in_flight in [1, 2] {
        let mut settings = UpstreamSettings::new("plc", address);
        settings.max_in_flight = max_in_flight;
        let pool = Pool::new(settings, emitter.clone());
        group.bench_function(format!("max_in_flight_{max_in_flight}"), |bench| {
            bench.iter_custom(|iterations| time_calls(&runtime, &pool, iterations))
        });
        pool.shutdown();
    }
    group.finish();
}

criterion_group!(benches, pool_call);
criterion_main!(benches);

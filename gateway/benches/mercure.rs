//! What the Mercure hub costs per update and subscriber on a replica: the filter each
//! subscription applies (exact selectors, URI templates, `*`, a private update checked against
//! the token's selectors), decoding and framing an update (once per replica), and compiling a
//! template selector (once per replica, cached). Run with
//! `cargo bench -p sse-gateway --bench mercure`; figures in BENCHMARKS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use sse_gateway::mercure::subscribe::Filter;
use ssegw_protocol::mercure::selector::Selector;
use ssegw_protocol::mercure::update::{self, Update};

fn update(topics: &[&str], private: bool) -> Update {
    Update {
        id: "urn:uuid:01938c4e-0000-7000-8000-000000000000".into(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        private,
        kind: None,
        retry: None,
        data: "x".repeat(200),
    }
}

fn filter(selectors: &[&str], claims: Option<&[&str]>) -> Filter {
    Filter {
        selectors: selectors.iter().map(|s| Selector::new(s)).collect(),
        claims: claims.map(|c| c.iter().map(|s| Selector::new(s)).collect()),
    }
}

fn bench(c: &mut Criterion) {
    let book = update(&["https://example.com/books/1"], false);
    let other = update(&["https://example.com/authors/7"], false);
    let mut group = c.benchmark_group("mercure filter, per update and subscription");
    let exact = filter(&["https://example.com/books/1"], None);
    group.bench_function("exact selector, match", |b| {
        b.iter(|| black_box(&exact).accepts(black_box(&book)))
    });
    group.bench_function("exact selector, no match", |b| {
        b.iter(|| black_box(&exact).accepts(black_box(&other)))
    });
    let template = filter(&["https://example.com/books/{id}"], None);
    group.bench_function("template selector, match", |b| {
        b.iter(|| black_box(&template).accepts(black_box(&book)))
    });
    group.bench_function("template selector, no match", |b| {
        b.iter(|| black_box(&template).accepts(black_box(&other)))
    });
    let any = filter(&["*"], None);
    group.bench_function("* selector", |b| {
        b.iter(|| black_box(&any).accepts(black_box(&book)))
    });
    let private = update(
        &[
            "https://example.com/books/1",
            "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1",
        ],
        true,
    );
    let claimed = filter(
        &["https://example.com/books/{id}"],
        Some(&["https://example.com/users/foo/{?topic}"]),
    );
    group.bench_function("private update, template selector and claim", |b| {
        b.iter(|| black_box(&claimed).accepts(black_box(&private)))
    });
    group.finish();

    let mut group = c.benchmark_group("mercure update, once per replica");
    let blob = update::encode(&book);
    group.bench_function("decode a 200-byte update", |b| {
        b.iter(|| update::decode(black_box(&blob)).unwrap())
    });
    group.bench_function("frame a 200-byte update", |b| {
        b.iter(|| black_box(&book).frame())
    });
    group.bench_function("compile a template selector", |b| {
        b.iter(|| Selector::new(black_box("https://example.com/books/{id}/reviews/{review}")))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

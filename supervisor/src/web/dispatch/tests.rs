//! Tests of the dispatcher against real socket pairs and offer regions, the worker's side played
//! by the test.

use super::offers::AHEAD_DEPTH;
use super::*;
use crate::test_support::runtime;
use crate::web::worker::frame::{self, Channel, RequestFrame};
use crate::web::worker::offer::worker_side::Claimer;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The slots of a worker and its side of them: sockets and the offer claimer.
struct Theirs {
    sockets: Vec<tokio::net::UnixStream>,
    worker: Claimer,
}

fn channels(count: usize) -> (Vec<RequestSlot>, Theirs) {
    let (mailboxes, worker) = Claimer::new(count);
    let mut ours = Vec::new();
    let mut sockets = Vec::new();
    for mailbox in mailboxes {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        ours.push(RequestSlot {
            channel: Channel::new(a),
            mailbox,
        });
        sockets.push(b);
    }
    (ours, Theirs { sockets, worker })
}

/// A dispatcher whose offers ahead never go stale unless a test says so: a test machine
/// may pause longer than `AHEAD_WINDOW` anywhere.
fn dispatcher(queue_size: usize) -> (Arc<Dispatcher>, mpsc::UnboundedReceiver<Notice>) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let metrics = Arc::new(Metrics::new().unwrap());
    let dispatcher = Dispatcher::new(queue_size, Duration::from_millis(200), metrics, sender);
    set_window(&dispatcher, Duration::from_secs(3600));
    (dispatcher, receiver)
}

/// A dispatcher serving generation 1 with one single-slot worker (id 1), and that worker's
/// side.
fn one_worker(queue_size: usize) -> (Arc<Dispatcher>, mpsc::UnboundedReceiver<Notice>, Theirs) {
    let (dispatcher, notices) = dispatcher(queue_size);
    dispatcher.set_generation(1);
    let (slots, theirs) = channels(1);
    dispatcher.add_worker(1, 0, 1, slots, None);
    (dispatcher, notices, theirs)
}

fn set_window(dispatcher: &Dispatcher, window: Duration) {
    dispatcher.lock().ahead_window = window;
}

/// A request frame whose environ names it.
fn request(name: &str) -> BytesMut {
    let mut frame = RequestFrame::new(64);
    frame.environ().extend_from_slice(name.as_bytes());
    frame.inline_body(b"", false)
}

/// The environ of an offered frame the worker claimed.
fn name(frame: Option<Vec<u8>>) -> Option<String> {
    frame.map(|frame| String::from_utf8_lossy(&frame[frame::HEADER_LEN..]).into_owned())
}

async fn acquire(dispatcher: &Arc<Dispatcher>) -> Result<Lease, Rejected> {
    dispatcher.acquire(request("x"), TIMEOUT).await
}

fn spawn_acquire(
    dispatcher: &Arc<Dispatcher>,
    what: &str,
) -> tokio::task::JoinHandle<Result<Lease, Rejected>> {
    let dispatcher = Arc::clone(dispatcher);
    let frame = request(what);
    tokio::spawn(async move { dispatcher.acquire(frame, TIMEOUT).await })
}

fn done(mut lease: Lease) {
    let _ = lease.channel();
    lease.release(Outcome::Done);
}

fn taken_back(dispatcher: &Dispatcher) -> u64 {
    dispatcher.metrics.http_offers_taken_back_total.get()
}

#[test]
fn requests_go_to_the_least_loaded_worker_of_the_served_generation() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (a, _keep_a) = channels(2);
        let (b, _keep_b) = channels(2);
        let (canary, _keep_canary) = channels(2);
        dispatcher.add_worker(1, 0, 1, a, None);
        dispatcher.add_worker(2, 1, 1, b, None);
        dispatcher.add_worker(3, 2, 2, canary, None);
        let first = acquire(&dispatcher).await.unwrap();
        let second = acquire(&dispatcher).await.unwrap();
        assert_ne!(
            first.worker(),
            second.worker(),
            "both GILs get work before either gets two"
        );
        assert!([first.worker(), second.worker()].iter().all(|id| *id != 3));
    });
}

#[test]
fn a_returned_slot_goes_to_the_oldest_waiter_and_a_full_queue_refuses() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(1);
        dispatcher.set_generation(1);
        let (slots, _keep) = channels(1);
        dispatcher.add_worker(7, 0, 1, slots, None);
        let busy = acquire(&dispatcher).await.unwrap();
        let waiting = spawn_acquire(&dispatcher, "waiting");
        tokio::task::yield_now().await;
        assert_eq!(
            acquire(&dispatcher).await.err(),
            Some(Rejected::QueueFull),
            "a request offered ahead counts as waiting"
        );
        done(busy);
        assert_eq!(waiting.await.unwrap().map(|lease| lease.worker()), Ok(7));
        assert_eq!(dispatcher.loads()[0].served, 1);
    });
}

#[test]
fn waiting_too_long_is_a_queue_timeout() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        assert_eq!(
            acquire(&dispatcher).await.err(),
            Some(Rejected::QueueTimeout)
        );
        dispatcher.close();
        assert_eq!(
            acquire(&dispatcher).await.err(),
            Some(Rejected::ShuttingDown)
        );
    });
}

#[test]
fn max_requests_asks_for_a_recycle_once_and_timeouts_stop_routing() {
    runtime().block_on(async {
        let (dispatcher, mut notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (slots, _keep) = channels(1);
        dispatcher.add_worker(5, 0, 1, slots, Some(2));
        for _ in 0..3 {
            done(acquire(&dispatcher).await.unwrap());
        }
        assert!(matches!(notices.try_recv(), Ok(Notice::RecycleWanted(5))));
        assert!(notices.try_recv().is_err(), "asked once");
        let mut lease = acquire(&dispatcher).await.unwrap();
        let _ = lease.channel();
        lease.release(Outcome::TimedOut("GET /slow".to_owned()));
        assert!(matches!(
            notices.try_recv(),
            Ok(Notice::TimedOut { worker: 5, .. })
        ));
        assert!(!dispatcher.holds(5));
        assert_eq!(
            acquire(&dispatcher).await.err(),
            Some(Rejected::QueueTimeout)
        );
    });
}

#[test]
fn a_canary_gets_only_its_warm_up_until_its_generation_is_served_then_both_serve() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (old, _keep_old) = channels(1);
        let (canary, _keep_canary) = channels(1);
        dispatcher.add_worker(1, 0, 1, old, None);
        dispatcher.add_worker(2, 1, 2, canary, None);
        let first = acquire(&dispatcher).await.unwrap();
        assert_eq!(first.worker(), 1);
        assert_eq!(
            acquire(&dispatcher).await.err(),
            Some(Rejected::QueueTimeout),
            "the canary takes no ordinary request"
        );
        let warm_up = dispatcher.acquire_from(2).unwrap();
        assert_eq!(warm_up.worker(), 2);
        drop(warm_up);
        dispatcher.set_generation(2);
        let second = acquire(&dispatcher).await.unwrap();
        assert_eq!(second.worker(), 2, "old and new serve side by side");
        drop(first);
        dispatcher.set_limits(0, Duration::from_millis(10));
        let _third = acquire(&dispatcher).await.unwrap();
        assert_eq!(acquire(&dispatcher).await.err(), Some(Rejected::QueueFull));
    });
}

#[test]
fn retired_workers_close_idle_slots_and_finish_busy_ones() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (slots, _keep) = channels(2);
        dispatcher.add_worker(9, 0, 1, slots, None);
        let lease = acquire(&dispatcher).await.unwrap();
        dispatcher.retire(9);
        assert!(dispatcher.holds(9), "its request is still running");
        done(lease);
        assert!(!dispatcher.holds(9));
    });
}

#[test]
fn a_busy_slot_gets_offers_ahead_up_to_the_depth_and_hands_the_slot_straight_to_them() {
    runtime().block_on(async {
        let (dispatcher, _notices, mut theirs) = one_worker(8);
        let mut first = acquire(&dispatcher).await.unwrap();
        assert!(first.was_offered() && first.take_request().is_none());
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("x"));
        let ahead: Vec<String> = (0..AHEAD_DEPTH).map(|n| format!("ahead {n}")).collect();
        let mut waiting: Vec<_> = ahead
            .iter()
            .map(|what| spawn_acquire(&dispatcher, what))
            .collect();
        let queued = spawn_acquire(&dispatcher, "queued");
        tokio::task::yield_now().await;
        // The worker finds its next requests without waiting for the first one's end to be
        // read; the last one waits in the queue (`AHEAD_DEPTH` offers ahead per slot).
        for what in &ahead {
            assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some(what.as_str()));
        }
        assert_eq!(theirs.worker.claim(0), None);
        done(first);
        waiting.push(queued);
        for (index, request) in waiting.into_iter().enumerate() {
            let mut lease = request.await.unwrap().unwrap();
            assert!(lease.was_offered() && lease.take_request().is_none());
            assert_eq!(dispatcher.loads()[0].busy, 1);
            if index == 0 {
                // A slot came free behind the first: the queued request is offered in its place.
                assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("queued"));
            }
            done(lease);
        }
        assert_eq!(dispatcher.loads()[0].served, 2 + AHEAD_DEPTH as u64);
        assert_eq!(taken_back(&dispatcher), 0);
    });
}

#[test]
fn reaching_an_earlier_offer_takes_back_the_later_ones_and_offers_them_again() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(8);
        dispatcher.set_generation(1);
        let (a, mut theirs_a) = channels(1);
        let (b, mut theirs_b) = channels(1);
        dispatcher.add_worker(1, 0, 1, a, None);
        let first = acquire(&dispatcher).await.unwrap();
        let older = spawn_acquire(&dispatcher, "older");
        tokio::task::yield_now().await;
        let younger = spawn_acquire(&dispatcher, "younger");
        tokio::task::yield_now().await;
        // A slot frees elsewhere: it takes the oldest offer, which means taking back the one
        // behind it first; that one is offered again, to the slot whose request started last.
        dispatcher.add_worker(2, 1, 1, b, None);
        let older = older.await.unwrap().unwrap();
        assert_eq!(older.worker(), 2);
        assert_eq!(taken_back(&dispatcher), 2);
        assert_eq!(name(theirs_a.worker.claim(0)).as_deref(), Some("x"));
        assert_eq!(theirs_a.worker.claim(0), None, "both taken back");
        assert_eq!(name(theirs_b.worker.claim(0)).as_deref(), Some("older"));
        assert_eq!(name(theirs_b.worker.claim(0)).as_deref(), Some("younger"));
        done(older);
        let younger = younger.await.unwrap().unwrap();
        assert_eq!(younger.worker(), 2);
        assert!(younger.was_offered());
        drop((first, younger));
    });
}

#[test]
fn a_request_giving_up_takes_back_only_what_the_worker_has_not_claimed() {
    runtime().block_on(async {
        let (dispatcher, _notices, mut theirs) = one_worker(8);
        let first = acquire(&dispatcher).await.unwrap();
        let leaving = spawn_acquire(&dispatcher, "leaving");
        tokio::task::yield_now().await;
        let staying = spawn_acquire(&dispatcher, "staying");
        tokio::task::yield_now().await;
        // The client of the first offer ahead goes away: the offer behind it is taken back on
        // the way and offered again, in the region the one that left had used.
        leaving.abort();
        assert!(leaving.await.unwrap_err().is_cancelled());
        assert_eq!(taken_back(&dispatcher), 2);
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("x"));
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("staying"));
        assert_eq!(theirs.worker.claim(0), None);
        // Claimed: it stays with the worker whatever happens to the queue now.
        let last = spawn_acquire(&dispatcher, "last");
        tokio::task::yield_now().await;
        done(first);
        let staying = staying.await.unwrap().unwrap();
        assert!(staying.was_offered() && staying.worker() == 1);
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("last"));
        assert_eq!(taken_back(&dispatcher), 2);
        done(staying);
        done(last.await.unwrap().unwrap());
        assert_eq!(dispatcher.loads()[0].served, 3);
    });
}

#[test]
fn a_slot_that_frees_takes_back_an_unclaimed_offer_from_a_busy_one() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (a, mut theirs_a) = channels(1);
        let (b, mut theirs_b) = channels(1);
        dispatcher.add_worker(1, 0, 1, a, None);
        dispatcher.add_worker(2, 1, 1, b, None);
        let medium = acquire(&dispatcher).await.unwrap();
        let slow = acquire(&dispatcher).await.unwrap();
        assert_ne!(medium.worker(), slow.worker());
        let slow_worker = slow.worker();
        // Offered ahead to the slot whose request started last.
        let fast = spawn_acquire(&dispatcher, "fast");
        tokio::task::yield_now().await;
        done(medium);
        let fast = fast.await.unwrap().unwrap();
        assert_ne!(fast.worker(), slow_worker, "it runs where a slot freed");
        assert_eq!(taken_back(&dispatcher), 1);
        let (freed, busy) = if slow_worker == 1 {
            (&mut theirs_b, &mut theirs_a)
        } else {
            (&mut theirs_a, &mut theirs_b)
        };
        assert_eq!(name(busy.worker.claim(0)).as_deref(), Some("x"));
        assert_eq!(busy.worker.claim(0), None, "taken back from the slow one");
        assert_eq!(name(freed.worker.claim(0)).as_deref(), Some("x"));
        assert_eq!(name(freed.worker.claim(0)).as_deref(), Some("fast"));
        drop((fast, slow));
    });
}

#[test]
fn a_claimed_offer_stays_with_its_worker() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (a, mut theirs) = channels(1);
        let (b, _theirs_b) = channels(1);
        dispatcher.add_worker(1, 0, 1, a, None);
        let first = acquire(&dispatcher).await.unwrap();
        let next = spawn_acquire(&dispatcher, "next");
        tokio::task::yield_now().await;
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("x"));
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("next"));
        // A slot frees elsewhere, but the worker has already started "next".
        dispatcher.add_worker(2, 1, 1, b, None);
        assert_eq!(taken_back(&dispatcher), 0);
        done(first);
        let next = next.await.unwrap().unwrap();
        assert_eq!(next.worker(), 1);
        assert!(next.was_offered());
    });
}

#[test]
fn offers_of_a_dead_worker_are_dispatched_again_unless_it_claimed_them() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (a, _theirs_a) = channels(1);
        dispatcher.add_worker(1, 3, 1, a, None);
        let running = acquire(&dispatcher).await.unwrap();
        let unclaimed = spawn_acquire(&dispatcher, "unclaimed");
        tokio::task::yield_now().await;
        dispatcher.remove(1);
        let (b, mut theirs_b) = channels(1);
        dispatcher.add_worker(2, 4, 1, b, None);
        let unclaimed = unclaimed.await.unwrap().unwrap();
        assert_eq!(unclaimed.worker(), 2, "never started, so run elsewhere");
        assert_eq!(name(theirs_b.worker.claim(0)).as_deref(), Some("unclaimed"));
        drop(running);

        let claimed = spawn_acquire(&dispatcher, "claimed");
        tokio::task::yield_now().await;
        assert_eq!(name(theirs_b.worker.claim(0)).as_deref(), Some("claimed"));
        let mut unclaimed = unclaimed;
        let _ = unclaimed.channel();
        unclaimed.release(Outcome::Gone);
        assert_eq!(claimed.await.unwrap().err(), Some(Rejected::WorkerGone(4)));
    });
}

#[test]
fn retiring_a_worker_moves_its_unclaimed_offer_to_the_queue() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (a, _theirs_a) = channels(1);
        dispatcher.add_worker(1, 0, 1, a, None);
        let running = acquire(&dispatcher).await.unwrap();
        let offered = spawn_acquire(&dispatcher, "offered");
        tokio::task::yield_now().await;
        dispatcher.retire(1);
        assert_eq!(taken_back(&dispatcher), 1);
        let (b, _theirs_b) = channels(1);
        dispatcher.add_worker(2, 1, 1, b, None);
        assert_eq!(offered.await.unwrap().unwrap().worker(), 2);
        done(running);
        assert!(!dispatcher.holds(1));
    });
}

#[test]
fn giving_up_takes_an_offer_back_and_an_unclaimed_request_in_service_can_be_withdrawn() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        dispatcher.set_generation(1);
        let (a, mut theirs) = channels(1);
        dispatcher.add_worker(1, 0, 1, a, None);
        let running = acquire(&dispatcher).await.unwrap();
        // Offered ahead, then its queue timeout (200 ms) passes: taken back, a 503.
        assert_eq!(
            acquire(&dispatcher).await.err(),
            Some(Rejected::QueueTimeout)
        );
        assert_eq!(taken_back(&dispatcher), 1);
        // The request in service was never claimed: withdrawn, the slot is idle again.
        let mut running = running;
        assert!(running.withdraw());
        assert_eq!(dispatcher.loads()[0].busy, 0);
        let next = dispatcher.acquire(request("next"), TIMEOUT).await.unwrap();
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("next"));
        assert_eq!(theirs.worker.claim(0), None);
        // Claimed: it stays.
        let mut next = next;
        assert!(!next.withdraw());
        done(next);
    });
}

#[test]
fn a_request_given_up_while_offered_ahead_is_taken_back() {
    runtime().block_on(async {
        let (dispatcher, _notices, mut theirs) = one_worker(4);
        let running = acquire(&dispatcher).await.unwrap();
        // Its client leaves while it is offered ahead: hyper drops the request's future.
        let gone = spawn_acquire(&dispatcher, "gone");
        tokio::task::yield_now().await;
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(taken_back(&dispatcher), 1);
        let next = spawn_acquire(&dispatcher, "next");
        tokio::task::yield_now().await;
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("x"));
        assert_eq!(name(theirs.worker.claim(0)).as_deref(), Some("next"));
        done(running);
        assert!(next.await.unwrap().unwrap().was_offered());
    });
}

#[test]
fn a_request_given_up_after_its_worker_claimed_it_is_aborted_and_drained() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    runtime().block_on(async {
        let (dispatcher, _notices, mut theirs) = one_worker(4);
        let running = acquire(&dispatcher).await.unwrap();
        let gone = spawn_acquire(&dispatcher, "gone");
        tokio::task::yield_now().await;
        assert!(theirs.worker.claim(0).is_some());
        let claimed = theirs.worker.claim(0).unwrap();
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(taken_back(&dispatcher), 0, "the worker has it");
        done(running);
        // Nobody reads its answer: the worker is told, and the slot waits for its end.
        let mut abort = [0u8; frame::HEADER_LEN];
        theirs.sockets[0].read_exact(&mut abort).await.unwrap();
        assert_eq!(abort[8], frame::Kind::Abort as u8);
        assert_eq!(
            &abort[4..6],
            &claimed[10..12],
            "the Abort names that request"
        );
        assert_eq!(dispatcher.loads()[0].busy, 1);
        let mut end = BytesMut::new();
        frame::put_header(&mut end, frame::Kind::End, 0, 0, 0);
        theirs.sockets[0].write_all(&end).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while dispatcher.loads()[0].busy != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the drained slot is idle again");
        assert_eq!(dispatcher.loads()[0].served, 2);
    });
}

#[test]
fn an_offer_behind_a_request_that_runs_long_moves_to_the_next_slot_that_moves_on() {
    runtime().block_on(async {
        let (dispatcher, _notices) = dispatcher(4);
        set_window(&dispatcher, Duration::from_millis(300));
        dispatcher.set_limits(4, Duration::from_secs(30));
        dispatcher.set_generation(1);
        let (slots, mut theirs) = channels(2);
        dispatcher.add_worker(1, 0, 1, slots, None);
        let fast = acquire(&dispatcher).await.unwrap();
        let slow = acquire(&dispatcher).await.unwrap();
        let (fast_lane, slow_lane) = (fast.lane, slow.lane);
        // "behind" goes behind the request that started last (the slow one), "next" behind
        // the other; the worker's fast thread claims its next request at once.
        let behind = spawn_acquire(&dispatcher, "behind");
        tokio::task::yield_now().await;
        let next = spawn_acquire(&dispatcher, "next");
        tokio::task::yield_now().await;
        assert_eq!(name(theirs.worker.claim(fast_lane)).as_deref(), Some("x"));
        assert_eq!(
            name(theirs.worker.claim(fast_lane)).as_deref(),
            Some("next")
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        done(fast);
        // The fast slot moves on to "next"; "behind" has waited past the window behind the
        // slow request: taken back and offered behind "next" instead.
        assert_eq!(taken_back(&dispatcher), 1);
        assert_eq!(
            name(theirs.worker.claim(fast_lane)).as_deref(),
            Some("behind")
        );
        assert_eq!(name(theirs.worker.claim(slow_lane)).as_deref(), Some("x"));
        assert_eq!(theirs.worker.claim(slow_lane), None);
        done(next.await.unwrap().unwrap());
        assert_eq!(behind.await.unwrap().unwrap().lane, fast_lane);
        drop(slow);
    });
}

// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

interface IERC20Like {
    function transfer(address to, uint256 value) external returns (bool);
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

/// @title DvpEscrow
/// @notice Holds ERC-20 units for one settlement leg until the operator (or a
/// hashlock preimage) commits them to the beneficiary, or they are released back to
/// the owner.
///
/// Invariants:
/// * A lock id is used at most once, ever: Open -> Committed or Open -> Released,
///   and nothing leaves either end state. Commit after release and release after
///   commit revert, so no lock pays twice.
/// * `release` of an id never seen, by the operator, records a tombstone (Released,
///   amount 0): a `lock` that arrives later with that id reverts.
/// * `held[token][owner]` is the sum of the open locks of `owner` in `token`, and the
///   escrow's balance of a token is at least the sum of its open locks.
/// * `expiry == 0` means the lock never expires (it was placed so, or pinned).
///   Anyone may release an open lock whose expiry has passed; only the operator
///   otherwise.
contract DvpEscrow {
    enum State {
        None,
        Open,
        Committed,
        Released
    }

    struct Lock {
        address token;
        uint64 expiry;
        State state;
        address owner;
        address beneficiary;
        uint256 amount;
        bytes32 hashlock;
    }

    address public immutable operator;
    mapping(bytes32 lockId => Lock) public locks;
    /// @notice Sum of the open locks of `owner` in `token`.
    mapping(address token => mapping(address owner => uint256)) public held;

    bytes32[] private _open;
    mapping(bytes32 lockId => uint256) private _openSlot; // index in _open, plus one

    event Locked(
        bytes32 indexed lockId,
        address indexed token,
        address indexed owner,
        address beneficiary,
        uint256 amount,
        uint64 expiry,
        bytes32 hashlock,
        string memo
    );
    event Committed(bytes32 indexed lockId, address indexed beneficiary, uint256 amount, bytes32 preimage);
    event Released(bytes32 indexed lockId, address indexed owner, uint256 amount, address by);
    event Pinned(bytes32 indexed lockId);

    error NotOperator(address caller);
    error LockExists(bytes32 lockId, State state);
    error UnknownLock(bytes32 lockId);
    error LockNotOpen(bytes32 lockId, State state);
    error NotExpired(bytes32 lockId, uint64 expiry);
    error LockExpired(bytes32 lockId, uint64 expiry);
    error NoHashlock(bytes32 lockId);
    error WrongPreimage(bytes32 lockId);
    error InvalidLock(string reason);
    error TokenTransferFailed(address token);

    constructor(address operator_) {
        if (operator_ == address(0)) revert InvalidLock("operator is the zero address");
        operator = operator_;
    }

    modifier onlyOperator() {
        if (msg.sender != operator) revert NotOperator(msg.sender);
        _;
    }

    /// @notice Move `amount` of `token` from `owner` (who approved this contract) into
    /// the escrow under `lockId`. `memo` is carried in the event only (the caller's own
    /// reference, e.g. its idempotency key).
    function lock(
        bytes32 lockId,
        address token,
        address owner,
        address beneficiary,
        uint256 amount,
        uint64 expiry,
        bytes32 hashlock,
        string calldata memo
    ) external onlyOperator {
        State state = locks[lockId].state;
        if (state != State.None) revert LockExists(lockId, state);
        if (token.code.length == 0) revert InvalidLock("token is not a contract");
        if (owner == address(0) || beneficiary == address(0)) revert InvalidLock("zero address");
        if (amount == 0) revert InvalidLock("amount is zero");
        locks[lockId] = Lock(token, expiry, State.Open, owner, beneficiary, amount, hashlock);
        held[token][owner] += amount;
        _open.push(lockId);
        _openSlot[lockId] = _open.length;
        emit Locked(lockId, token, owner, beneficiary, amount, expiry, hashlock, memo);
        _pull(token, owner, amount);
    }

    /// @notice Pay an open lock to its beneficiary. Operator only, and allowed after
    /// expiry too: expiry lets the owner take the units back, it does not stop a
    /// settlement that gets there first (whichever transaction is mined first wins).
    function commit(bytes32 lockId) external onlyOperator {
        _commit(lockId, bytes32(0));
    }

    /// @notice Pay an open, unexpired lock to its beneficiary, by anyone who knows
    /// the preimage of its hashlock (`sha256(preimage) == hashlock`).
    function claim(bytes32 lockId, bytes32 preimage) external {
        Lock storage l = locks[lockId];
        if (l.state != State.Open) revert LockNotOpen(lockId, l.state);
        if (l.hashlock == bytes32(0)) revert NoHashlock(lockId);
        if (l.expiry != 0 && block.timestamp >= l.expiry) revert LockExpired(lockId, l.expiry);
        if (sha256(abi.encodePacked(preimage)) != l.hashlock) revert WrongPreimage(lockId);
        _commit(lockId, preimage);
    }

    /// @notice Give an open lock back to its owner: the operator at any time, anyone
    /// once it has expired. The operator releasing an unknown id leaves a tombstone.
    function release(bytes32 lockId) external {
        Lock storage l = locks[lockId];
        if (l.state == State.None) {
            if (msg.sender != operator) revert UnknownLock(lockId);
            l.state = State.Released;
            emit Released(lockId, address(0), 0, msg.sender);
            return;
        }
        if (l.state != State.Open) revert LockNotOpen(lockId, l.state);
        if (msg.sender != operator && (l.expiry == 0 || block.timestamp < l.expiry)) {
            revert NotExpired(lockId, l.expiry);
        }
        l.state = State.Released;
        _close(lockId, l);
        emit Released(lockId, l.owner, l.amount, msg.sender);
        _push(l.token, l.owner, l.amount);
    }

    /// @notice Clear an open lock's expiry: from now on only the operator (or the
    /// preimage) ends it. Operator only.
    function pin(bytes32 lockId) external onlyOperator {
        Lock storage l = locks[lockId];
        if (l.state != State.Open) revert LockNotOpen(lockId, l.state);
        l.expiry = 0;
        emit Pinned(lockId);
    }

    /// @notice The ids of every open lock, in no particular order.
    function openLocks() external view returns (bytes32[] memory) {
        return _open;
    }

    function _commit(bytes32 lockId, bytes32 preimage) private {
        Lock storage l = locks[lockId];
        if (l.state != State.Open) revert LockNotOpen(lockId, l.state);
        l.state = State.Committed;
        _close(lockId, l);
        emit Committed(lockId, l.beneficiary, l.amount, preimage);
        _push(l.token, l.beneficiary, l.amount);
    }

    function _close(bytes32 lockId, Lock storage l) private {
        held[l.token][l.owner] -= l.amount;
        uint256 slot = _openSlot[lockId];
        uint256 last = _open.length;
        if (slot != last) {
            bytes32 moved = _open[last - 1];
            _open[slot - 1] = moved;
            _openSlot[moved] = slot;
        }
        _open.pop();
        delete _openSlot[lockId];
    }

    function _pull(address token, address from, uint256 amount) private {
        if (!IERC20Like(token).transferFrom(from, address(this), amount)) revert TokenTransferFailed(token);
    }

    function _push(address token, address to, uint256 amount) private {
        if (!IERC20Like(token).transfer(to, amount)) revert TokenTransferFailed(token);
    }
}

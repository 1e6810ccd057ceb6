// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title AccountRegistry
/// @notice The names a dvp ledger gives to things on this chain: asset symbol ->
/// token contract, and account id -> (wallet, token, owner name). Balances are not
/// kept here: they are the tokens' own `balanceOf`. Every process that opens the
/// ledger (worker, CLI) reads the same names from here, so none needs a side file.
///
/// Invariants: a symbol names one token and an account id one (wallet, token, owner),
/// forever; a wallet holds at most one account per token, so (token, wallet) names
/// the account back. Re-registering the same thing is a no-op; anything else reverts.
contract AccountRegistry {
    struct Account {
        address wallet;
        address token;
        string owner;
    }

    address public immutable operator;
    /// @notice The escrow that settles this ledger's locks.
    address public immutable escrow;

    mapping(bytes32 symbolKey => address) private _tokenOf;
    string[] private _symbols;
    mapping(bytes32 accountKey => Account) private _accounts;
    string[] private _accountIds;
    mapping(address token => mapping(address wallet => string)) private _accountAt;

    event AssetRegistered(string symbol, address indexed token);
    event AccountRegistered(string account, address indexed wallet, address indexed token, string owner);

    error NotOperator(address caller);
    error AssetConflict(string symbol, address token);
    error AccountConflict(string account);
    error WalletInUse(address wallet, address token, string account);
    error InvalidEntry(string reason);

    constructor(address operator_, address escrow_) {
        if (operator_ == address(0)) revert InvalidEntry("operator is the zero address");
        operator = operator_;
        escrow = escrow_;
    }

    modifier onlyOperator() {
        if (msg.sender != operator) revert NotOperator(msg.sender);
        _;
    }

    function registerAsset(string calldata symbol, address token) external onlyOperator {
        if (bytes(symbol).length == 0 || token == address(0)) revert InvalidEntry("empty symbol or zero token");
        bytes32 key = keccak256(bytes(symbol));
        address known = _tokenOf[key];
        if (known == token) return;
        if (known != address(0)) revert AssetConflict(symbol, known);
        _tokenOf[key] = token;
        _symbols.push(symbol);
        emit AssetRegistered(symbol, token);
    }

    function registerAccount(string calldata account, address wallet, address token, string calldata owner)
        external
        onlyOperator
    {
        if (bytes(account).length == 0 || wallet == address(0) || token == address(0)) {
            revert InvalidEntry("empty account or zero address");
        }
        bytes32 key = keccak256(bytes(account));
        Account storage known = _accounts[key];
        if (known.wallet != address(0)) {
            if (known.wallet == wallet && known.token == token && keccak256(bytes(known.owner)) == keccak256(bytes(owner))) {
                return;
            }
            revert AccountConflict(account);
        }
        string storage other = _accountAt[token][wallet];
        if (bytes(other).length != 0) revert WalletInUse(wallet, token, other);
        _accounts[key] = Account(wallet, token, owner);
        _accountIds.push(account);
        _accountAt[token][wallet] = account;
        emit AccountRegistered(account, wallet, token, owner);
    }

    function tokenOf(string calldata symbol) external view returns (address) {
        return _tokenOf[keccak256(bytes(symbol))];
    }

    function assets() external view returns (string[] memory symbols, address[] memory tokens) {
        symbols = _symbols;
        tokens = new address[](symbols.length);
        for (uint256 i = 0; i < symbols.length; i++) {
            tokens[i] = _tokenOf[keccak256(bytes(symbols[i]))];
        }
    }

    /// @notice The account `account`; a zero wallet if it is not registered.
    function accountOf(string calldata account) external view returns (address wallet, address token, string memory owner) {
        Account storage a = _accounts[keccak256(bytes(account))];
        return (a.wallet, a.token, a.owner);
    }

    /// @notice The id of the account `wallet` holds in `token`; empty if none.
    function accountAt(address token, address wallet) external view returns (string memory) {
        return _accountAt[token][wallet];
    }

    function accountIds() external view returns (string[] memory) {
        return _accountIds;
    }
}

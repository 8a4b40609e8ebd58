"""
Synthetic 10-K databases of fictional companies, and questions over them with gold answers computed from the data.

    python -m data.synth --out data/generated/synth [--seed 0 --companies 100]

Writes OUT/tasks.jsonl and OUT/dbs/<company>.db. Each database holds 15-26 wide tables (row_idx, section, item,
then one REAL column per fiscal year, y2021..y2024) drawn from 26 table kinds under varied snake_case names, plus a
_catalog table of descriptions and units. The accounting holds by construction: assets = liabilities + equity,
segments and regions sum to revenue, quarters sum to the year, every breakdown table sums to the statement line it
explains. Companies are split train/val/test, so val and test companies are unseen in training.
"""
import argparse
import json
import math
import os
import random
import shutil
import time

import sqlite_utils

YEARS = [2021, 2022, 2023, 2024]
YCOLS = [f"y{y}" for y in YEARS]

NAME_A = ["Arden", "Bluewater", "Cobalt", "Driftwood", "Ember", "Fairmont", "Granite", "Halcyon", "Ironbark", "Juniper",
          "Keystone", "Larkspur", "Meridian", "Northwind", "Oakridge", "Pinnacle", "Quarry", "Redfern", "Silverline",
          "Tidewater", "Umber", "Vantage", "Westbrook", "Yarrow", "Zephyr", "Alder", "Briar", "Cedarline", "Dunmore",
          "Elmstead"]
NAME_B = ["Microsystems", "Foods", "Logistics", "Therapeutics", "Industries", "Software", "Energy", "Retail Group",
          "Materials", "Networks", "Aerospace", "Apparel", "Semiconductors", "Health", "Robotics", "Media"]
SEGMENTS = ["Cloud Services", "Devices", "Enterprise Solutions", "Consumer Products", "Industrial", "Healthcare",
            "Payments", "Advertising", "Components", "Licensing"]
REGIONS = ["United States", "Europe", "Asia Pacific", "Latin America", "Canada", "Middle East and Africa"]
PRODUCTS = ["Platform subscriptions", "Hardware", "Professional services", "Maintenance and support", "Licenses",
            "Consumables"]

# kind -> (name variants, description, unit)
KINDS = {
    "income_statement": (["income_statement", "consolidated_statements_of_operations", "statement_of_income"],
                         "Consolidated income statement by fiscal year", "$ millions"),
    "balance_sheet": (["balance_sheet", "consolidated_balance_sheets", "statement_of_financial_position"],
                      "Consolidated balance sheet at fiscal year end", "$ millions"),
    "cash_flow": (["cash_flow_statement", "consolidated_statements_of_cash_flows", "cash_flows"],
                  "Consolidated statement of cash flows by fiscal year", "$ millions"),
    "segment_revenue": (["segment_revenue", "revenue_by_segment", "segment_information"],
                        "Revenue by reportable segment", "$ millions"),
    "geographic_revenue": (["geographic_revenue", "revenue_by_geography", "revenue_by_region"],
                           "Revenue by geographic region", "$ millions"),
    "quarterly_revenue": (["quarterly_revenue", "quarterly_results_revenue", "unaudited_quarterly_revenue"],
                          "Unaudited quarterly revenue (Q1-Q4 and full year)", "$ millions"),
    "quarterly_net_income": (["quarterly_net_income", "quarterly_results_net_income"],
                             "Unaudited quarterly net income (Q1-Q4 and full year)", "$ millions"),
    "debt_summary": (["debt_summary", "borrowings", "debt_and_interest"],
                     "Debt outstanding, interest expense and interest rate", "$ millions unless noted"),
    "debt_maturities": (["debt_maturities", "scheduled_debt_maturities", "long_term_debt_maturities"],
                        "Scheduled principal payments of debt by year due, as of fiscal 2024 year end", "$ millions"),
    "share_repurchases": (["share_repurchases", "stock_repurchase_program", "treasury_stock_purchases"],
                          "Common stock repurchased under the buyback program", "mixed: see item labels"),
    "headcount": (["headcount", "employees_by_function", "workforce"],
                  "Full-time employees at fiscal year end by function", "employees"),
    "stock_compensation": (["stock_based_compensation", "share_based_compensation_expense", "stock_compensation"],
                           "Stock-based compensation expense by line item", "$ millions"),
    "ppe": (["property_plant_and_equipment", "ppe_net", "fixed_assets"],
            "Property, plant and equipment by class, net of accumulated depreciation", "$ millions"),
    "income_taxes": (["income_taxes", "provision_for_income_taxes", "income_tax_expense_components"],
                     "Components of the provision for income taxes", "$ millions"),
    "dividends": (["dividends", "dividends_declared", "cash_dividends"],
                  "Cash dividends per share and in total", "mixed: see item labels"),
    "eps": (["earnings_per_share", "eps_computation", "per_share_data"],
            "Earnings per share and weighted average shares", "mixed: see item labels"),
    "operating_expenses": (["operating_expenses", "opex_breakdown", "operating_expense_detail"],
                           "Operating expenses by function", "$ millions"),
    "intangibles": (["intangible_assets", "acquired_intangibles", "intangible_assets_net"],
                    "Acquired intangible assets, net of amortization", "$ millions"),
    "goodwill": (["goodwill_by_segment", "goodwill", "goodwill_allocation"], "Goodwill allocated to segments", "$ millions"),
    "inventory": (["inventories", "inventory_components", "inventory"], "Inventories by stage", "$ millions"),
    "accrued": (["accrued_liabilities", "accrued_expenses", "other_accrued_liabilities"],
                "Accrued liabilities by type", "$ millions"),
    "deferred_revenue": (["deferred_revenue", "contract_liabilities", "unearned_revenue"],
                         "Deferred revenue, current and noncurrent", "$ millions"),
    "product_revenue": (["revenue_by_product", "product_revenue", "revenue_by_offering"],
                        "Revenue by product and service line", "$ millions"),
    "receivables": (["accounts_receivable", "receivables_net", "trade_receivables"],
                    "Accounts receivable and allowance for credit losses", "$ millions"),
    "capex_segment": (["capital_expenditures_by_segment", "capex_by_segment", "segment_capital_spending"],
                      "Purchases of property and equipment by segment", "$ millions"),
    "leases": (["lease_costs", "operating_lease_expense", "lease_expense"], "Components of lease cost", "$ millions"),
}
CORE = ["income_statement", "balance_sheet", "cash_flow", "segment_revenue", "geographic_revenue", "quarterly_revenue",
        "debt_summary", "debt_maturities", "share_repurchases", "headcount", "stock_compensation", "ppe", "income_taxes",
        "dividends", "eps"]


def r1(x):
    return round(x, 1)


def split(total, parts, rng, lo=0.5, hi=1.5, nd=1):
    """total split into parts by random weights; the last part is the remainder, so the sum is exact."""
    w = [rng.uniform(lo, hi) for _ in range(parts)]
    vals = [round(total * x / sum(w), nd) for x in w[:-1]]
    return vals + [round(total - sum(vals), nd)]


# -----------------------------------------------------------------------------
# One company: the statements first, then every breakdown table derived from them


def company_tables(rng):
    """-> {kind: [(section, item, {ycol: value})]} with the accounting identities exact."""
    T = {k: [] for k in KINDS}
    add = lambda kind, section, item, vals: T[kind].append((section, item, dict(zip(YCOLS, vals))))
    n = len(YEARS)
    rev = [r1(rng.uniform(400, 20000))]
    for _ in range(n - 1):
        rev.append(r1(rev[-1] * (1 + rng.uniform(-0.06, 0.25))))
    cogs = [r1(v * rng.uniform(0.35, 0.7)) for v in rev]
    gp = [r1(a - b) for a, b in zip(rev, cogs)]
    rnd = [r1(v * rng.uniform(0.05, 0.15)) for v in rev]
    sm = [r1(v * rng.uniform(0.06, 0.14)) for v in rev]
    ga = [r1(v * rng.uniform(0.03, 0.07)) for v in rev]
    sga = [r1(a + b) for a, b in zip(sm, ga)]
    opex = [r1(a + b) for a, b in zip(rnd, sga)]
    oi = [r1(a - b) for a, b in zip(gp, opex)]
    # balance sheet first (interest depends on debt): assets, equity as a share of them, liabilities as shares of
    # the rest with "other noncurrent liabilities" the plug, so A = L + E exactly and every line stays positive
    ppe_net = [r1(v * rng.uniform(0.2, 0.5)) for v in rev]
    ar = [r1(v * rng.uniform(0.08, 0.18)) for v in rev]
    inv = [r1(v * rng.uniform(0.04, 0.15)) for v in rev]
    cash = [r1(v * rng.uniform(0.1, 0.4)) for v in rev]
    oca = [r1(v * rng.uniform(0.01, 0.05)) for v in rev]
    tca = [r1(a + b + c + d) for a, b, c, d in zip(cash, ar, inv, oca)]
    gw = [r1(rng.uniform(0.05, 0.3) * rev[0])] * n
    intang = [r1(v * rng.uniform(0.02, 0.1)) for v in rev]
    onca = [r1(v * rng.uniform(0.01, 0.06)) for v in rev]
    ta = [r1(a + b + c + d + e) for a, b, c, d, e in zip(tca, ppe_net, gw, intang, onca)]
    te = [r1(v * rng.uniform(0.35, 0.6)) for v in ta]
    tl = [r1(a - b) for a, b in zip(ta, te)]
    debt = [r1(v * rng.uniform(0.25, 0.45)) for v in tl]
    st_debt = [r1(d * rng.uniform(0.05, 0.2)) for d in debt]
    lt_debt = [r1(d - s_) for d, s_ in zip(debt, st_debt)]
    ap = [r1(v * rng.uniform(0.08, 0.15)) for v in tl]
    accrued = [r1(v * rng.uniform(0.05, 0.1)) for v in tl]
    dr_cur = [r1(v * rng.uniform(0.02, 0.06)) for v in tl]
    tcl = [r1(a + b + c + d) for a, b, c, d in zip(ap, accrued, st_debt, dr_cur)]
    dr_nc = [r1(v * rng.uniform(0.0, 0.03)) for v in tl]
    oncl = [r1(l - c - d - e) for l, c, d, e in zip(tl, tcl, lt_debt, dr_nc)]  # >= 0.21 * tl by the shares above
    apic = [r1(v * rng.uniform(0.3, 0.7)) for v in te]
    re_ = [r1(a - b) for a, b in zip(te, apic)]
    rate = [round(rng.uniform(2.5, 7.0), 2) for _ in YEARS]
    interest = [r1(d * rt / 100) for d, rt in zip(debt, rate)]
    other = [r1(v * rng.uniform(-0.01, 0.015)) for v in rev]
    ibt = [r1(a - b + c) for a, b, c in zip(oi, interest, other)]
    tax = [r1(v * rng.uniform(0.12, 0.27)) for v in ibt]
    ni = [r1(a - b) for a, b in zip(ibt, tax)]
    basic_sh = [r1(rng.uniform(60, 1500))]
    for _ in range(n - 1):
        basic_sh.append(r1(basic_sh[-1] * rng.uniform(0.95, 1.01)))
    dil_sh = [r1(s * rng.uniform(1.005, 1.03)) for s in basic_sh]

    add("income_statement", "Revenue", "Total revenue", rev)
    add("income_statement", "Costs", "Cost of revenue", cogs)
    add("income_statement", "Costs", "Gross profit", gp)
    add("income_statement", "Operating expenses", "Research and development", rnd)
    add("income_statement", "Operating expenses", "Selling, general and administrative", sga)
    add("income_statement", "Operating expenses", "Total operating expenses", opex)
    add("income_statement", "Operating expenses", "Operating income", oi)
    add("income_statement", "Other", "Interest and other income (expense), net", [r1(c - b) for b, c in zip(interest, other)])
    add("income_statement", "Other", "Income before income taxes", ibt)
    add("income_statement", "Other", "Provision for income taxes", tax)
    add("income_statement", "Other", "Net income", ni)

    # operating expense detail
    add("operating_expenses", "", "Research and development", rnd)
    add("operating_expenses", "", "Sales and marketing", sm)
    add("operating_expenses", "", "General and administrative", ga)
    add("operating_expenses", "", "Total operating expenses", opex)

    # segments, regions, products: each sums to revenue
    segs = rng.sample(SEGMENTS, rng.randint(2, 4))
    seg_rev = list(zip(*[split(v, len(segs), rng) for v in rev]))
    for s, vals in zip(segs, seg_rev):
        add("segment_revenue", "", s, vals)
    add("segment_revenue", "", "Total revenue", rev)
    regs = rng.sample(REGIONS, rng.randint(3, 5))
    for g, vals in zip(regs, zip(*[split(v, len(regs), rng) for v in rev])):
        add("geographic_revenue", "", g, vals)
    add("geographic_revenue", "", "Total revenue", rev)
    prods = rng.sample(PRODUCTS, rng.randint(3, 5))
    for p, vals in zip(prods, zip(*[split(v, len(prods), rng) for v in rev])):
        add("product_revenue", "", p, vals)
    add("product_revenue", "", "Total revenue", rev)

    # quarters sum to the year (the last two fiscal years, other columns NULL)
    for kind, series in (("quarterly_revenue", rev), ("quarterly_net_income", ni)):
        qs = {y: split(v, 4, rng, 0.8, 1.2) if y in YEARS[-2:] else [None] * 4 for y, v in zip(YEARS, series)}
        for q in range(4):
            add(kind, "", f"Q{q + 1}", [qs[y][q] for y in YEARS])
        add(kind, "", "Full year", [v if y in YEARS[-2:] else None for y, v in zip(YEARS, series)])

    # stock comp (feeds cash flow), PP&E (feeds balance sheet), dividends and buybacks (feed cash flow)
    sbc = [r1(v * rng.uniform(0.01, 0.06)) for v in rev]
    sbc_lines = ["Cost of revenue", "Research and development", "Sales and marketing", "General and administrative"]
    for line, vals in zip(sbc_lines, zip(*[split(v, 4, rng) for v in sbc])):
        add("stock_compensation", "", line, vals)
    add("stock_compensation", "", "Total stock-based compensation", sbc)
    classes = ["Land", "Buildings and improvements", "Machinery and equipment", "Computer equipment and software",
               "Construction in progress"]
    gross_parts = [split(v * rng.uniform(1.4, 1.9), 5, rng) for v in ppe_net]
    gross = [r1(sum(p)) for p in gross_parts]
    for c, vals in zip(classes, zip(*gross_parts)):
        add("ppe", "Gross", c, vals)
    add("ppe", "Gross", "Total property, plant and equipment, gross", gross)
    add("ppe", "", "Less: accumulated depreciation", [r1(n_ - g) for n_, g in zip(ppe_net, gross)])
    add("ppe", "", "Property, plant and equipment, net", ppe_net)

    eps_ = [max(a / b, 0.2) for a, b in zip(ni, basic_sh)]  # a loss year still pays a small dividend
    dps = [round(e * rng.uniform(0.15, 0.45), 2) for e in eps_]
    div_total = [r1(d * s) for d, s in zip(dps, basic_sh)]
    add("dividends", "", "Dividends declared per share ($)", dps)
    add("dividends", "", "Total dividends paid ($ millions)", div_total)
    bb_shares = [round(rng.uniform(0.5, 3.0) * s / 100, 2) for s in basic_sh]
    bb_price = [round(e * rng.uniform(12, 30), 2) for e in eps_]  # price = EPS x a P/E multiple
    bb_cost = [r1(a * b) for a, b in zip(bb_shares, bb_price)]
    add("share_repurchases", "", "Shares repurchased (millions)", bb_shares)
    add("share_repurchases", "", "Average price paid per share ($)", bb_price)
    add("share_repurchases", "", "Total cost of repurchases ($ millions)", bb_cost)

    for item, vals in (("Cash and cash equivalents", cash), ("Accounts receivable, net", ar), ("Inventories", inv),
                       ("Other current assets", oca), ("Total current assets", tca),
                       ("Property, plant and equipment, net", ppe_net), ("Goodwill", gw), ("Intangible assets, net", intang),
                       ("Other noncurrent assets", onca), ("Total assets", ta)):
        add("balance_sheet", "Assets", item, vals)
    for item, vals in (("Accounts payable", ap), ("Accrued liabilities", accrued), ("Short-term debt", st_debt),
                       ("Deferred revenue, current", dr_cur), ("Total current liabilities", tcl), ("Long-term debt", lt_debt),
                       ("Deferred revenue, noncurrent", dr_nc), ("Other noncurrent liabilities", oncl),
                       ("Total liabilities", tl)):
        add("balance_sheet", "Liabilities", item, vals)
    for item, vals in (("Common stock and additional paid-in capital", apic), ("Retained earnings", re_),
                       ("Total stockholders' equity", te), ("Total liabilities and stockholders' equity", ta)):
        add("balance_sheet", "Equity", item, vals)

    # breakdowns of balance sheet lines
    for c, vals in zip(["Raw materials", "Work in process", "Finished goods"], zip(*[split(v, 3, rng) for v in inv])):
        add("inventory", "", c, vals)
    add("inventory", "", "Total inventories", inv)
    for c, vals in zip(["Compensation and benefits", "Income taxes payable", "Customer rebates", "Other"],
                       zip(*[split(v, 4, rng) for v in accrued])):
        add("accrued", "", c, vals)
    add("accrued", "", "Total accrued liabilities", accrued)
    add("deferred_revenue", "", "Deferred revenue, current", dr_cur)
    add("deferred_revenue", "", "Deferred revenue, noncurrent", dr_nc)
    add("deferred_revenue", "", "Total deferred revenue", [r1(a + b) for a, b in zip(dr_cur, dr_nc)])
    allowance = [r1(-v * rng.uniform(0.01, 0.05)) for v in ar]
    add("receivables", "", "Accounts receivable, gross", [r1(a - b) for a, b in zip(ar, allowance)])
    add("receivables", "", "Allowance for credit losses", allowance)
    add("receivables", "", "Accounts receivable, net", ar)
    it_gross = [split(v * rng.uniform(1.3, 1.8), 3, rng) for v in intang]
    for c, vals in zip(["Customer relationships", "Developed technology", "Trade names"], zip(*it_gross)):
        add("intangibles", "", c, vals)
    add("intangibles", "", "Less: accumulated amortization", [r1(v - sum(g)) for v, g in zip(intang, it_gross)])
    add("intangibles", "", "Intangible assets, net", intang)
    for s, vals in zip(segs, zip(*[split(v, len(segs), rng) for v in gw[:1]] * n)):
        add("goodwill", "", s, vals)
    add("goodwill", "", "Total goodwill", gw)

    # debt
    add("debt_summary", "", "Short-term debt", st_debt)
    add("debt_summary", "", "Long-term debt", lt_debt)
    add("debt_summary", "", "Total debt", debt)
    add("debt_summary", "", "Interest expense", interest)
    add("debt_summary", "", "Weighted average interest rate (%)", rate)
    due = split(debt[-1], 6, rng)
    for label, v in zip(["Due in 2025", "Due in 2026", "Due in 2027", "Due in 2028", "Due in 2029", "Thereafter"], due):
        T["debt_maturities"].append(("", label, {"amount": v}))
    T["debt_maturities"].append(("", "Total debt", {"amount": debt[-1]}))

    # income taxes: components sum to the provision
    cur = [split(v * rng.uniform(0.7, 1.1), 3, rng) for v in tax]
    for c, vals in zip(["Current: federal", "Current: state", "Current: foreign"], zip(*cur)):
        add("income_taxes", "Current", c, vals)
    tot_cur = [r1(sum(c)) for c in cur]
    add("income_taxes", "Current", "Total current", tot_cur)
    deferred = [r1(t - c) for t, c in zip(tax, tot_cur)]
    dfed = [r1(d * rng.uniform(0.4, 0.8)) for d in deferred]
    add("income_taxes", "Deferred", "Deferred: federal", dfed)
    add("income_taxes", "Deferred", "Deferred: foreign", [r1(d - f) for d, f in zip(deferred, dfed)])
    add("income_taxes", "Deferred", "Total deferred", deferred)
    add("income_taxes", "", "Total provision for income taxes", tax)

    # EPS
    add("eps", "", "Net income ($ millions)", ni)
    add("eps", "", "Weighted average basic shares (millions)", basic_sh)
    add("eps", "", "Weighted average diluted shares (millions)", dil_sh)
    add("eps", "", "Basic EPS ($)", [round(a / b, 2) for a, b in zip(ni, basic_sh)])
    add("eps", "", "Diluted EPS ($)", [round(a / b, 2) for a, b in zip(ni, dil_sh)])

    # headcount
    hc_total = [int(v * rng.uniform(1.5, 6.0)) for v in rev]  # employees per $M of revenue
    funcs = ["Engineering", "Sales and marketing", "Operations", "General and administrative"]
    parts = [split(h, 4, rng, nd=0) for h in hc_total]
    for f_, vals in zip(funcs, zip(*parts)):
        add("headcount", "", f_, [int(v) for v in vals])
    add("headcount", "", "Total employees", hc_total)

    # cash flow
    da = [r1(v * rng.uniform(0.08, 0.16)) for v in ppe_net]
    wc = [r1(v * rng.uniform(-0.04, 0.03)) for v in rev]
    cfo = [r1(a + b + c + d) for a, b, c, d in zip(ni, da, sbc, wc)]
    capex = [r1(-v * rng.uniform(0.03, 0.09)) for v in rev]
    acq = [r1(-v * rng.uniform(0, 0.05)) if rng.random() < 0.5 else 0.0 for v in rev]
    cfi = [r1(a + b) for a, b in zip(capex, acq)]
    dnet = [r1(v * rng.uniform(-0.03, 0.05)) for v in rev]
    # other financing is the plug that makes the net change in cash equal the change in balance-sheet cash
    prior_cash = [r1(cash[0] * rng.uniform(0.8, 1.2))] + cash[:-1]
    ofin = [r1(c - p - (o + i + d - b - v)) for c, p, o, i, d, b, v in zip(cash, prior_cash, cfo, cfi, dnet, bb_cost, div_total)]
    cff = [r1(a - b - c + d) for a, b, c, d in zip(dnet, bb_cost, div_total, ofin)]
    for sec, item, vals in (("Operating", "Net income", ni), ("Operating", "Depreciation and amortization", da),
                            ("Operating", "Stock-based compensation", sbc), ("Operating", "Changes in working capital", wc),
                            ("Operating", "Net cash provided by operating activities", cfo),
                            ("Investing", "Purchases of property and equipment", capex), ("Investing", "Acquisitions, net of cash acquired", acq),
                            ("Investing", "Net cash used in investing activities", cfi),
                            ("Financing", "Proceeds from (repayments of) debt, net", dnet),
                            ("Financing", "Repurchases of common stock", [-v for v in bb_cost]),
                            ("Financing", "Dividends paid", [-v for v in div_total]),
                            ("Financing", "Other financing activities, net", ofin),
                            ("Financing", "Net cash provided by (used in) financing activities", cff),
                            ("", "Net change in cash", [r1(c - p) for c, p in zip(cash, prior_cash)])):
        add("cash_flow", sec, item, vals)
    for s, vals in zip(segs, zip(*[split(-v, len(segs), rng) for v in capex])):
        add("capex_segment", "", s, vals)
    add("capex_segment", "", "Total capital expenditures", [-v for v in capex])
    lease = [r1(v * rng.uniform(0.005, 0.02)) for v in rev]
    for c, vals in zip(["Operating lease cost", "Short-term lease cost", "Variable lease cost"], zip(*[split(v, 3, rng) for v in lease])):
        add("leases", "", c, vals)
    add("leases", "", "Total lease cost", lease)
    return T, {"segments": segs, "regions": regs}


# -----------------------------------------------------------------------------
# Questions. Each template names its gold cells (kind, item, column) and an expression over them; the gold answer is
# the expression on the stored values, rounded to 2 decimals. The oracle in eval.py re-derives it through the tools.

PHRASES = {  # (kind, item) -> how a question names it
    ("income_statement", "Total revenue"): "total revenue",
    ("income_statement", "Gross profit"): "gross profit",
    ("income_statement", "Operating income"): "operating income",
    ("income_statement", "Net income"): "net income",
    ("income_statement", "Research and development"): "research and development expense",
    ("income_statement", "Cost of revenue"): "cost of revenue",
    ("balance_sheet", "Total assets"): "total assets",
    ("balance_sheet", "Cash and cash equivalents"): "cash and cash equivalents",
    ("balance_sheet", "Total liabilities"): "total liabilities",
    ("balance_sheet", "Total stockholders' equity"): "total stockholders' equity",
    ("balance_sheet", "Inventories"): "inventories",
    ("cash_flow", "Net cash provided by operating activities"): "operating cash flow",
    ("cash_flow", "Depreciation and amortization"): "depreciation and amortization",
    ("headcount", "Total employees"): "the number of employees",
    ("stock_compensation", "Total stock-based compensation"): "stock-based compensation expense",
    ("income_taxes", "Total provision for income taxes"): "the provision for income taxes",
    ("debt_summary", "Total debt"): "total debt",
    ("debt_summary", "Interest expense"): "interest expense",
    ("ppe", "Property, plant and equipment, net"): "net property, plant and equipment",
    ("dividends", "Total dividends paid ($ millions)"): "total dividends paid",
    ("share_repurchases", "Total cost of repurchases ($ millions)"): "the amount spent on share repurchases",
}
UNITS = {"headcount": "employees"}


def cell(kind, item, col):
    return {"kind": kind, "item": item, "column": col}


# (template, question (or phrasings to pick from), cells as (kind, item), expression, unit)
MULTI_TABLE = [
    ("revenue_per_employee", "What was {C}'s revenue per employee in fiscal {y}, in thousands of dollars?",
     [("income_statement", "Total revenue"), ("headcount", "Total employees")], "{0} * 1000 / {1}", "$ thousands"),
    ("interest_coverage", ["What was {C}'s interest coverage ratio (operating income over interest expense) in fiscal {y}?",
                           "How many times did operating income cover interest expense at {C} in FY{y}?"],
     [("income_statement", "Operating income"), ("debt_summary", "Interest expense")], "{0} / {1}", "x"),
    ("fcf_margin", "What was {C}'s free cash flow margin (operating cash flow minus capital expenditures, over revenue) in fiscal {y}?",
     [("cash_flow", "Net cash provided by operating activities"), ("cash_flow", "Purchases of property and equipment"),
      ("income_statement", "Total revenue")], "({0} + {1}) / {2} * 100", "%"),
    ("payout_ratio", "What was {C}'s dividend payout ratio (total dividends paid over net income) in fiscal {y}?",
     [("dividends", "Total dividends paid ($ millions)"), ("income_statement", "Net income")], "{0} / {1} * 100", "%"),
    ("roe", "What was {C}'s return on equity (net income over year-end stockholders' equity) in fiscal {y}?",
     [("income_statement", "Net income"), ("balance_sheet", "Total stockholders' equity")], "{0} / {1} * 100", "%"),
    ("effective_tax_rate", "What was {C}'s effective tax rate in fiscal {y}?",
     [("income_taxes", "Total provision for income taxes"), ("income_statement", "Income before income taxes")], "{0} / {1} * 100", "%"),
    ("sbc_share", "What was {C}'s stock-based compensation as a percentage of revenue in fiscal {y}?",
     [("stock_compensation", "Total stock-based compensation"), ("income_statement", "Total revenue")], "{0} / {1} * 100", "%"),
    ("debt_to_equity", "What was {C}'s debt-to-equity ratio (total debt over stockholders' equity) at the end of fiscal {y}?",
     [("debt_summary", "Total debt"), ("balance_sheet", "Total stockholders' equity")], "{0} / {1}", "x"),
]


def make_questions(T, meta, rng, company):
    """-> list of (kind, template, question, cells, expr, unit). expr uses {0}, {1}, ... for the cells' values."""
    Q = []
    C = company
    yrs = YEARS
    have = lambda kind: bool(T[kind])

    def pick_fact():
        kind, item = rng.choice([k for k in PHRASES if have(k[0])])
        return kind, item, PHRASES[(kind, item)], UNITS.get(kind, "$ millions")

    # single-table templates
    for _ in range(3):
        kind, item, ph, unit = pick_fact()
        y = rng.choice(yrs)
        q = rng.choice([f"What was {C}'s {ph} in fiscal {y}?", f"Report {ph} for {C} in fiscal year {y}.",
                        f"How much was {ph} at {C} in FY{y}?"])
        Q.append(("single_table", "lookup", q, [cell(kind, item, f"y{y}")], "{0}", unit))
    for _ in range(2):
        kind, item, ph, unit = pick_fact()
        y1, y2 = sorted(rng.sample(yrs, 2))
        q = rng.choice([f"By how much did {C}'s {ph} change from fiscal {y1} to fiscal {y2}?",
                        f"What was the change in {ph} at {C} between FY{y1} and FY{y2}?"])
        Q.append(("single_table", "change", q, [cell(kind, item, f"y{y1}"), cell(kind, item, f"y{y2}")], "{1} - {0}", unit))
    for _ in range(2):
        kind, item, ph, unit = pick_fact()
        y1 = rng.choice(yrs[:-1])
        y2 = y1 + 1
        q = rng.choice([f"What was the percentage change in {C}'s {ph} from fiscal {y1} to fiscal {y2}?",
                        f"By what percent did {ph} grow at {C} in FY{y2} versus FY{y1}?"])
        Q.append(("single_table", "pct_change", q, [cell(kind, item, f"y{y1}"), cell(kind, item, f"y{y2}")],
                  "({1} - {0}) / {0} * 100", "%"))
    y = rng.choice(yrs)
    a, b = rng.sample(meta["segments"], 2)
    Q.append(("single_table", "difference", f"How much more revenue did {C}'s {a} segment generate than its {b} segment in fiscal {y}?",
              [cell("segment_revenue", a, f"y{y}"), cell("segment_revenue", b, f"y{y}")], "{0} - {1}", "$ millions"))
    y = rng.choice(yrs)
    Q.append(("single_table", "ratio", rng.choice([f"What was {C}'s current ratio at the end of fiscal {y}?",
                                                   f"Compute the current ratio (current assets over current liabilities) for {C} in FY{y}."]),
              [cell("balance_sheet", "Total current assets", f"y{y}"), cell("balance_sheet", "Total current liabilities", f"y{y}")],
              "{0} / {1}", "x"))
    y = rng.choice(yrs)
    Q.append(("single_table", "ratio", f"What was {C}'s ratio of total liabilities to total stockholders' equity at the end of fiscal {y}?",
              [cell("balance_sheet", "Total liabilities", f"y{y}"), cell("balance_sheet", "Total stockholders' equity", f"y{y}")],
              "{0} / {1}", "x"))
    for margin, item in (("gross margin", "Gross profit"), ("operating margin", "Operating income"), ("net profit margin", "Net income")):
        if rng.random() < 0.6:
            y = rng.choice(yrs)
            Q.append(("single_table", "margin", rng.choice([f"What was {C}'s {margin} in fiscal {y}?",
                                                            f"Calculate the {margin} of {C} for FY{y}, in percent."]),
                      [cell("income_statement", item, f"y{y}"), cell("income_statement", "Total revenue", f"y{y}")],
                      "{0} / {1} * 100", "%"))
    for kind, item, ph in (("income_statement", "Total revenue", "total revenue"), ("headcount", "Total employees", "headcount")):
        Q.append(("single_table", "cagr", f"What was the compound annual growth rate of {C}'s {ph} from fiscal {yrs[0]} to fiscal {yrs[-1]}?",
                  [cell(kind, item, f"y{yrs[0]}"), cell(kind, item, f"y{yrs[-1]}")], f"(({{1}} / {{0}}) ** (1 / {len(yrs) - 1}) - 1) * 100", "%"))
    y = rng.choice(yrs)
    s = rng.choice(meta["segments"])
    Q.append(("single_table", "share", rng.choice([f"What share of {C}'s total revenue came from the {s} segment in fiscal {y}?",
                                                   f"What percentage of revenue did {s} contribute at {C} in FY{y}?"]),
              [cell("segment_revenue", s, f"y{y}"), cell("segment_revenue", "Total revenue", f"y{y}")], "{0} / {1} * 100", "%"))
    y = rng.choice(yrs)
    g = rng.choice(meta["regions"])
    Q.append(("single_table", "share", f"What percentage of {C}'s revenue was generated in {g} in fiscal {y}?",
              [cell("geographic_revenue", g, f"y{y}"), cell("geographic_revenue", "Total revenue", f"y{y}")], "{0} / {1} * 100", "%"))
    y = rng.choice(yrs[-2:])
    qn = rng.randint(1, 4)
    Q.append(("single_table", "lookup", f"What was {C}'s revenue in Q{qn} of fiscal {y}?",
              [cell("quarterly_revenue", f"Q{qn}", f"y{y}")], "{0}", "$ millions"))
    kind, item, ph, unit = pick_fact()
    Q.append(("single_table", "average", f"What was {C}'s average {ph} over fiscal {yrs[1]} to {yrs[-1]}?",
              [cell(kind, item, c) for c in YCOLS[1:]], "(" + " + ".join(f"{{{i}}}" for i in range(len(YCOLS) - 1)) + f") / {len(YCOLS) - 1}", unit))

    # multi-table templates: one fiscal year each, values from two or three tables
    for template, question, cells, expr, unit in MULTI_TABLE:
        y = rng.choice(yrs)
        q = rng.choice(question) if isinstance(question, list) else question
        Q.append(("multi_table", template, q.format(C=C, y=y), [cell(k, item, f"y{y}") for k, item in cells], expr, unit))
    return Q


def evaluate(expr, values):
    """The gold value of a template expression: Python arithmetic on the stored cell values (the oracle instead goes
    through SQL and the calculator tool)."""
    return eval(expr.format(*[repr(float(v)) for v in values]), {"__builtins__": {}})  # our own template strings only


# -----------------------------------------------------------------------------
# Writing databases and tasks


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def write_db(path, T, names, rng):
    db = sqlite_utils.Database(path, recreate=True)
    catalog = []
    for kind, rows in T.items():
        if kind not in names:
            continue
        name = names[kind]
        variants, desc, unit = KINDS[kind]
        cols = ["amount"] if kind == "debt_maturities" else YCOLS
        recs = [{"row_idx": i, "section": sec, "item": item, **{c: vals.get(c) for c in cols}} for i, (sec, item, vals) in enumerate(rows)]
        db[name].insert_all(recs, columns={"row_idx": int, "section": str, "item": str, **{c: float for c in cols}})
        catalog.append({"table_name": name, "column_name": "", "description": desc, "unit": unit})
        catalog.append({"table_name": name, "column_name": "row_idx", "description": "original row order", "unit": ""})
        catalog.append({"table_name": name, "column_name": "section", "description": "section heading the row sits under", "unit": ""})
        catalog.append({"table_name": name, "column_name": "item", "description": "row label", "unit": ""})
        for c in cols:
            cdesc = "amount due" if c == "amount" else f"fiscal year {c[1:]}"
            catalog.append({"table_name": name, "column_name": c, "description": cdesc, "unit": unit})
    db["_catalog"].insert_all(catalog, columns={"table_name": str, "column_name": str, "description": str, "unit": str})
    db.conn.execute("PRAGMA journal_mode = DELETE")
    db.conn.commit()
    db.close()


def build(out, seed=0, companies=100, val_frac=0.15, test_frac=0.2):
    rng = random.Random(seed)
    dbdir = os.path.join(out, "dbs")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(dbdir)
    names_used = set()
    tasks = []
    n_test = max(1, round(companies * test_frac))
    n_val = max(1, round(companies * val_frac))
    for ci in range(companies):
        crng = random.Random(f"{seed}-{ci}")  # each company reproducible on its own
        while True:
            cname = f"{rng.choice(NAME_A)} {rng.choice(NAME_B)}"
            if cname not in names_used:
                names_used.add(cname)
                break
        split_name = "test" if ci < n_test else "val" if ci < n_test + n_val else "train"
        T, meta = company_tables(crng)
        extra = [k for k in KINDS if k not in CORE]
        kinds = CORE + crng.sample(extra, crng.randint(15 - len(CORE), len(extra)))
        names = {k: crng.choice(KINDS[k][0]) for k in kinds}
        db_rel = f"dbs/{slug(cname)}.db"
        write_db(os.path.join(out, db_rel), T, names, crng)
        lookup = {(k, sec_item[1]): sec_item[2] for k in kinds for sec_item in T[k]}
        for j, (kind, template, q, cells, expr, unit) in enumerate(make_questions(T, meta, crng, cname)):
            vals = [lookup[(c["kind"], c["item"])][c["column"]] for c in cells]
            if any(v is None for v in vals) or (template == "cagr" and vals[0] <= 0):
                continue
            try:
                gold = evaluate(expr, vals)
            except ZeroDivisionError:
                continue
            if template == "cagr" and isinstance(gold, complex):
                continue
            gold_cells = [{"table": names[c["kind"]], "item": c["item"], "column": c["column"], "value": v}
                          for c, v in zip(cells, vals)]
            tasks.append({"id": f"synth-{slug(cname)}-{j:02d}", "question": q, "answer": round(gold, 2), "answer_type": "number",
                          "unit": unit, "scale": 1e6 if unit == "$ millions" else 1e3 if unit == "$ thousands" else 1.0,
                          "db": db_rel, "split": split_name, "kind": kind, "template": template,
                          "gold_tables": sorted({g["table"] for g in gold_cells}), "gold_cells": gold_cells, "expr": expr,
                          "company": cname})
    with open(os.path.join(out, "tasks.jsonl"), "w") as f:
        for t in tasks:
            f.write(json.dumps(t) + "\n")
    return tasks


def ensure_synth(out="data/generated/synth", **kw):
    """Build the default synthetic task set if it is absent; returns the tasks.jsonl path."""
    path = os.path.join(out, "tasks.jsonl")
    if not os.path.exists(path):
        build(out, **kw)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/generated/synth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--companies", type=int, default=100)
    args = ap.parse_args()
    t0 = time.time()
    tasks = build(args.out, args.seed, args.companies)
    by = {}
    for t in tasks:
        by[(t["split"], t["kind"])] = by.get((t["split"], t["kind"]), 0) + 1
    print(f"wrote {len(tasks)} tasks over {args.companies} companies to {args.out} in {time.time() - t0:.1f}s")
    for (s, k), n in sorted(by.items()):
        print(f"  {s:5s} {k:12s} {n}")


if __name__ == "__main__":
    main()
